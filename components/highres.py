"""highres: the model trained at 224 evaluated at 384, the paper's way (section 3.2).

Side by side on the test split, with the images resized to the new size:

1. no resize: the model refuses the new size with its own error;
2. position embeddings interpolated in 2D, bilinear;
3. interpolated, bicubic (the default);
4. bicubic, and the attention logits multiplied by the factor (1 to 2, or 1 to 1/2 when the
   size shrinks) that gives the lowest loss on the validation split at the new size: with
   577 tokens instead of 197 a briefly trained model does better with sharper attention
   than it was trained with, a well-trained one about 1 (benchmarks/RESULTS.md, "384 with
   and without a fine-tune"); no gradient step, one number chosen;
5. bicubic and then fine-tuned at the new size for a short schedule, as the paper does
   (SGD with momentum 0.9, gradient clipping, cosine decay; ``--finetune-steps 0`` skips it),
   on whole training images and flips: the training run's random-resized crops show objects
   larger than the test images do, and a fine-tune at the test size is where to undo that
   (Touvron et al. 2019, FixRes); ``--finetune-crop-scale`` crops again;
6. the fine-tuned weights interpolated back toward the bicubic ones, keeping the share of the
   fine-tune's change (0, 1/4, ..., 1) that gives the lowest loss on the validation split
   (WiSE-FT, Wortsman et al. 2022): a short fine-tune on a few thousand images also fits them
   a little too closely, and part of the way back keeps what the long training run learned
   (benchmarks/RESULTS.md, "WiSE-FT"). This model is the one saved;

and the accuracy at the training size as the reference row. Each variant's row also counts the
test images it gets right that the reference got wrong and the reverse, with McNemar's exact
p-value: on a few hundred test images one standard error of accuracy is a point or two (on
the headgear data's 100, about 3), so whether 384 is better or worse than 224 is a question
for the paired count, not the difference.

    python -m components.highres --checkpoint best.pt --data SRC --output-json highres.json
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from components.common import checkpoints, cli
from components.common.atomic import write_json
from components.common.data import DataVersion, check_source, resolve
from components.common.devices import pick_device
from components.common.images import decode_split, to_input
from components.common.metrics import correct, logit_metrics, predict, split_metrics
from components.common.presets import HIGHRES_SIZE, FinetuneConfig, check_image_size
from components.common.resize import calibrate_attention, chosen, finetune, interpolate_finetune
from components.common.resize_figures import Curve, attention_comparison, report_figures
from components.common.tracking import Tracker, open_task
from model import ViT


class Resizing(NamedTuple):
    """What every variant is built from: the trained model, the new size, the data, the
    validation split at the new size (on which the variants' numbers are chosen), the
    fine-tune's settings (None: skipped), the device, and the task the builds report to."""

    trained: ViT
    size: int
    dataset: DataVersion
    valid_images: np.ndarray
    valid_labels: np.ndarray
    finetune: FinetuneConfig | None
    device: torch.device
    tracker: Tracker

    def resized(self, mode: str = "bicubic") -> ViT:
        """A copy of the trained model, its position embeddings interpolated to the new size."""
        return copy.deepcopy(self.trained).set_image_size(self.size, mode=mode)


class Built(NamedTuple):
    """A variant's model, and what its build chose or recorded on the way (result keys)."""

    model: ViT
    chose: dict


def _interpolated(mode: str) -> Callable[[Resizing, dict], Built]:
    return lambda resizing, built: Built(resizing.resized(mode), {})


def _calibrated(resizing: Resizing, built: dict[str, ViT]) -> Built:
    model = resizing.resized()
    trained_tokens = 1 + resizing.trained.projector.grid[0] * resizing.trained.projector.grid[1]
    curve = calibrate_attention(model, resizing.valid_images, resizing.valid_labels, resizing.device, trained_tokens)
    print(f"attention scale chosen on the validation split: {model.config['attention_scale']:.3f}")
    scale = model.config["attention_scale"]
    return Built(model, {"attention_scale": scale, "attention_calibration": curve.to_dict(orient="records")})


def _finetuned(resizing: Resizing, built: dict[str, ViT]) -> Built | None:
    if resizing.finetune is None:
        return None
    train_images, train_labels = decode_split(resizing.dataset, "train", resizing.size)
    model = resizing.resized().to(resizing.device)
    losses = finetune(model, train_images, train_labels, resizing.finetune, resizing.device)
    for step, loss in enumerate(losses):
        resizing.tracker.scalar("fine-tune loss", f"train @ {resizing.size}", loss, step)
    return Built(model, {"finetune_losses": losses})


def _finetuned_interpolated(resizing: Resizing, built: dict[str, ViT]) -> Built:
    model = copy.deepcopy(built["finetuned"])
    before = built["bicubic"].state_dict()  # where the fine-tune started
    curve = interpolate_finetune(model, before, resizing.valid_images, resizing.valid_labels, resizing.device)
    print(f"share of the fine-tune's change kept, chosen on the validation split: {chosen(curve):.2f}")
    return Built(model, {"finetune_kept": chosen(curve), "finetune_interpolation": curve.to_dict(orient="records")})


class Variant(NamedTuple):
    """One way of running the trained model at the new size: ``name`` in its result keys
    (``test_accuracy_<name>``, ``test_loss_<name>``), ``label`` its row in the tables (from the
    result), what the row means (``{size}``: the new size), ``build`` its model from the
    variants it ``needs`` (None: skipped), and, where its build chose a number on the validation
    split, the result key of that number (``chose``) and the curve it was chosen on."""

    name: str
    label: Callable[[dict], str]
    meaning: str
    build: Callable[[Resizing, dict[str, ViT]], Built | None]
    needs: tuple[str, ...] = ()
    chose: str | None = None
    curve: Curve | None = None


VARIANTS = {  # in the order built: each needs only variants before it
    variant.name: variant
    for variant in (
        Variant(
            "bilinear",
            lambda result: "interpolated, bilinear",
            "the same model at {size} px, its position embeddings interpolated bilinearly, no training",
            _interpolated("bilinear"),
        ),
        Variant(
            "bicubic",
            lambda result: "interpolated, bicubic",
            "the same, interpolated bicubically (the paper's way)",
            _interpolated("bicubic"),
        ),
        Variant(
            "bicubic_calibrated",
            lambda result: f"bicubic, attention x{result['attention_scale']:.2f}",
            "bicubic, the attention logits multiplied by the factor with the lowest validation loss",
            _calibrated,
            chose="attention_scale",
            curve=Curve(
                "attention_calibration",
                "attention",
                "attention logits multiplied by (x)",
                "attention scale",
                "bicubic",
                "How the attention scale was chosen: validation loss and accuracy at {size} px (bicubic position "
                "embeddings) with the attention logits multiplied by each factor; the dashed line marks the factor "
                "with the lowest loss, used from then on.",
            ),
        ),
        Variant(
            "finetuned",
            lambda result: (
                "bicubic + fine-tuned"
                if result["test_accuracy_finetuned"] is not None
                else "bicubic + fine-tuned (skipped: --finetune-steps 0)"
            ),
            "bicubic, then a short fine-tune at {size} px on the training images ('-': not run)",
            _finetuned,
        ),
        Variant(
            "finetuned_interpolated",
            lambda result: (
                f"fine-tuned, x{result['finetune_kept']:.2f} of its change kept"
                if result["finetune_kept"] is not None
                else "fine-tuned, part of its change kept (skipped)"
            ),
            "the fine-tuned weights moved back toward the bicubic ones by the share with the lowest validation "
            "loss: the saved model",
            _finetuned_interpolated,
            needs=("bicubic", "finetuned"),
            chose="finetune_kept",
            curve=Curve(
                "finetune_interpolation",
                "interpolation",
                "share of the fine-tune's change kept (0 to 1)",
                "fine-tune kept",
                "fine-tuned",
                "How much of the fine-tune was kept: validation loss and accuracy with the weights moved from the "
                "bicubic model (0) to the fine-tuned one (1); the dashed line marks the share with the lowest loss, "
                "which is the saved model.",
            ),
        ),
    )
}
NOT_RUN = {"accuracy": None, "loss": None}
DEFAULT_FINETUNE = FinetuneConfig()


def refusal(trained: ViT, images: np.ndarray, device: torch.device) -> str | None:
    """1. as trained: the model must refuse the new size, and its error say how to fix it."""
    try:
        trained.to(device).eval()(to_input(torch.from_numpy(images[:1]).to(device)))
    except ValueError as error:
        return str(error)
    return None


def accuracy_table(result: dict, reference: dict, metrics: dict[str, dict]) -> pd.DataFrame:
    """The reference row, the refused one and a row per variant, labelled as `VARIANTS` say."""
    size, native = result["image_size"], result["trained_image_size"]
    rows = [
        {"variant": f"reference: trained size {native}", "image_size": native, **reference},
        {"variant": "no resize", "image_size": size, **NOT_RUN},
        *(
            {"variant": variant.label(result), "image_size": size, **metrics.get(name, NOT_RUN)}
            for name, variant in VARIANTS.items()
        ),
    ]
    return pd.DataFrame(rows).astype({"gained": "Int64", "lost": "Int64"})


class Reference(NamedTuple):
    """The trained model on the test split at its own size."""

    metrics: dict  # accuracy and loss
    correct: np.ndarray  # bool (N,): the images it got right
    predictions: np.ndarray  # int (N,)
    images: np.ndarray  # uint8 (N, S, S, 3) at the trained size


def measure_reference(trained: ViT, dataset: DataVersion, device: torch.device) -> Reference:
    """The reference row: the trained model at its own size, the accuracy every variant is held to."""
    images, labels = decode_split(dataset, "test", checkpoints.side(trained))
    logits = predict(trained.to(device), images, device)
    return Reference(logit_metrics(logits, labels), correct(logits, labels).numpy(), logits.argmax(1).numpy(), images)


def build_variants(
    resizing: Resizing, images: np.ndarray, labels: np.ndarray, reference_correct: np.ndarray
) -> tuple[dict[str, ViT], dict[str, dict], dict]:
    """Builds each of `VARIANTS` in turn (skipping those whose build, or a variant they need, was
    skipped); returns the models built, the test metrics of each against the reference's right
    answers, and what their builds chose (result keys)."""
    built, metrics, chose = {}, {}, {}
    for name, variant in VARIANTS.items():
        made = variant.build(resizing, built) if all(need in built for need in variant.needs) else None
        if made is not None:
            built[name] = made.model
            metrics[name] = split_metrics(made.model, images, labels, resizing.device, reference_correct)
            chose.update(made.chose)
    return built, metrics, chose


def variant_results(metrics: dict[str, dict], chose: dict, size: int) -> dict:
    """The result keys of the variants: test accuracy and loss of each (None where skipped), their
    changes against the reference, what their builds chose with the curves chosen on, and a row
    per variant for the run's report (``variants``: name, label, meaning, accuracy, chosen key)."""
    result = {
        **{f"test_accuracy_{name}": metrics.get(name, NOT_RUN)["accuracy"] for name in VARIANTS},
        **{f"test_loss_{name}": metrics.get(name, NOT_RUN)["loss"] for name in VARIANTS},
        "test_changes": {  # against the reference row, image by image
            name: {key: variant[key] for key in ("gained", "lost", "mcnemar_p")} for name, variant in metrics.items()
        },
        "attention_scale": chose["attention_scale"],
        "attention_calibration": chose["attention_calibration"],
        "finetune_losses": chose.get("finetune_losses", []),
        "finetune_kept": chose.get("finetune_kept"),
        "finetune_interpolation": chose.get("finetune_interpolation", []),
    }
    result["variants"] = [
        {
            "name": name,
            "label": variant.label(result),
            "meaning": variant.meaning.format(size=size),
            "test_accuracy": result[f"test_accuracy_{name}"],
            "chose": variant.chose,
        }
        for name, variant in VARIANTS.items()
    ]
    return result


def highres(
    checkpoint: Path,
    data: str,
    output_json: Path,
    image_size: int = HIGHRES_SIZE,
    finetune_config: FinetuneConfig | None = DEFAULT_FINETUNE,
    device: str = "auto",
) -> dict:
    """Runs the variants and returns ``{"image_size", "reference_accuracy" (at the trained size),
    "test_accuracy_<variant>" and "test_loss_<variant>" for each of `VARIANTS` (None where
    skipped), "attention_scale" (its factor), "finetune_kept" (the share of the fine-tune's
    change kept), "test_changes" ({variant: {"gained", "lost", "mcnemar_p"}} against the
    reference), "variants" (a row per variant for a report), "checkpoint" (the fine-tuned model,
    else the bicubic one), "model" (with a server its registered id, else the checkpoint), ...}``;
    also written to ``output_json``. ``finetune_config`` None (or of 0 steps) skips the fine-tune."""
    output_json = Path(output_json)
    device = pick_device(device)
    tuning = finetune_config or replace(DEFAULT_FINETUNE, steps=0)
    with open_task(output_json.stem, "testing", output_json.parent, title=f"highres {image_size}") as tracker:
        settings = {"checkpoint": str(checkpoint), "data": data, "image_size": image_size}
        tuned = {f"finetune_{name}": getattr(tuning, name) for name in FinetuneConfig.SETTINGS}
        params = tracker.connect({**settings, **tuned})
        size = params["image_size"]
        tuning = replace(tuning, **{name: params[f"finetune_{name}"] for name in FinetuneConfig.SETTINGS})
        trained, _ = checkpoints.load_model(params["checkpoint"])
        dataset = resolve(params["data"])
        images, labels = decode_split(dataset, "test", size)
        reference = measure_reference(trained, dataset, device)
        no_resize_error = refusal(trained, images, device)
        print(f"no resize: {no_resize_error}")
        tuning = tuning if tuning.steps > 0 else None
        resizing = Resizing(trained, size, dataset, *decode_split(dataset, "valid", size), tuning, device, tracker)
        built, metrics, chose = build_variants(resizing, images, labels, reference.correct)
        result = {
            "image_size": size,
            "trained_image_size": checkpoints.side(trained),
            "reference_accuracy": reference.metrics["accuracy"],
            "no_resize_error": no_resize_error,
            **variant_results(metrics, chose, size),
        }
        table = accuracy_table(result, reference.metrics, metrics)
        print(table.to_string(index=False))
        tracker.table("accuracy by variant", table)
        curves = [(variant.curve, variant.chose) for variant in VARIANTS.values() if variant.curve is not None]
        plots = report_figures(result, table, curves, trained, built["bicubic"], output_json, tracker)
        compared = (trained, reference.images, reference.predictions), (built["bicubic"], images)
        plots.append(attention_comparison(*compared, labels, dataset.classes, output_json, tracker))
        result.update(keep_model(built, dataset.classes, output_json.parent / f"model_{size}.pt", tracker), plots=plots)
        tracker.artifact("metrics", {k: v for k, v in result.items() if k not in ("finetune_losses", "plots")})
    result["clearml"] = tracker.session
    write_json(result, output_json)
    return result


def keep_model(built: dict[str, ViT], classes: list[str], path: Path, tracker: Tracker) -> dict:
    """Saves (and with a server registers) the model to use at the new size: the fine-tuned one
    with the share of its change kept, else the bicubic one; returns its result keys."""
    kept = built.get("finetuned_interpolated", built["bicubic"])
    checkpoints.save_atomic(checkpoints.payload(kept.state_dict(), kept.config, classes), path)
    registered = tracker.model(path, f"vit {checkpoints.side(kept)}", kept.config)
    return {"checkpoint": str(path), "model": registered or str(path)}


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("highres", __doc__)
    defaults = DEFAULT_FINETUNE
    parser.add_argument(
        "--checkpoint", required=True, help="a .pt file written by train, or (with a server) a model id"
    )
    parser.add_argument("--data", required=True, help="a zip, a folder, a data version folder or a ClearML Dataset id")
    parser.add_argument(
        "--image-size", type=cli.positive_int, default=HIGHRES_SIZE, help=f"the new input size ({HIGHRES_SIZE})"
    )
    parser.add_argument(
        "--finetune-steps",
        type=cli.nonnegative_int,
        default=defaults.steps,
        help=f"SGD steps at the new size; 0 skips ({defaults.steps})",
    )
    parser.add_argument(
        "--finetune-lr", type=cli.positive_float, default=defaults.lr, help=f"peak SGD learning rate ({defaults.lr})"
    )
    parser.add_argument("--finetune-batch-size", type=cli.positive_int, default=defaults.batch_size, help="(64)")
    parser.add_argument(
        "--finetune-crop-scale",
        type=cli.positive_float,
        default=defaults.crop_scale,
        help="smallest crop area of the fine-tune's random-resized crop; 1: whole images, as tested (1)",
    )
    parser.add_argument("--output-json", type=cli.output_file, required=True, help="where the results go")
    cli.add_device_flag(parser)
    args = parser.parse_args(argv)
    patch = cli.run(parser, checkpoints.patch_size, args.checkpoint)
    cli.run(parser, check_image_size, args.image_size, patch, "--image-size")
    cli.run(parser, check_source, args.data)
    settings = {name: getattr(args, f"finetune_{name}") for name in FinetuneConfig.SETTINGS}
    tuning = cli.run(parser, FinetuneConfig, **settings)
    cli.run(parser, highres, args.checkpoint, args.data, args.output_json, args.image_size, tuning, args.device)


if __name__ == "__main__":
    main()
