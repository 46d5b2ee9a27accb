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
p-value: on 500 test images one standard error of accuracy is about 1.5 points, so whether
384 is better or worse than 224 is a question for the paired count, not the difference.

    python -m components.highres --checkpoint best.pt --data SRC --output-json highres.json
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from components import checkpoints, cli
from components.atomic import write_json
from components.attention_maps import CAPTION as ATTENTION_CAPTION
from components.attention_maps import attention_figure, attention_sample
from components.augment import augment, endless_batches
from components.data import DataVersion, check_source, decode_split, resolve, to_input
from components.devices import mixed_precision, pick_device
from components.evaluate import accuracy, correct, predict
from components.plots import factor_figure, grouped_bars_figure, similarity_figure
from components.presets import TrainConfig, check_crop_scale
from components.tracking import Tracker, open_task
from components.train import learning_rate, optimization_step
from model import ViT


def split_metrics(
    model: ViT, images: np.ndarray, labels: np.ndarray, device: torch.device, reference: np.ndarray | None = None
) -> dict:
    """Accuracy and loss on a split. With ``reference``, which of its images the model got right
    at the size it was trained at: also how many it now gets right that it got wrong there
    ("gained"), the reverse ("lost"), and McNemar's exact p-value of the two ("mcnemar_p")."""
    return logit_metrics(predict(model.to(device), images, device), labels, reference)


def logit_metrics(logits: torch.Tensor, labels: np.ndarray, reference: np.ndarray | None = None) -> dict:
    metrics = {"accuracy": accuracy(logits, labels), "loss": F.cross_entropy(logits, torch.from_numpy(labels)).item()}
    if reference is not None:
        right = correct(logits, labels).numpy()
        gained, lost = int(np.sum(right & ~reference)), int(np.sum(~right & reference))
        metrics.update(gained=gained, lost=lost, mcnemar_p=mcnemar_p(gained, lost))
    return metrics


def mcnemar_p(gained: int, lost: int) -> float:
    """McNemar's exact test: the chance that, were both sizes equally accurate, the images one
    of them alone gets right would split at least this unevenly. At 500 test images a few
    points of accuracy can be chance; this says how likely."""
    changed, fewer = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(changed, k) for k in range(fewer + 1)) / 2**changed)


def finetune(
    model: ViT, images: np.ndarray, labels: np.ndarray, config: TrainConfig, steps: int, device: torch.device
) -> list[float]:
    """SGD with momentum 0.9 at the new size, cosine decay from ``config.lr``, gradient
    clipping, ``config``'s crop and flip; returns the loss of every step."""
    torch.manual_seed(config.seed)  # drop path and dropout draw the same whatever ran before
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    batches = endless_batches(len(images), config, device)
    clipped, autocast = replace(config, grad_clip=config.grad_clip or 1.0), mixed_precision(device)
    losses = []
    for step, batch in zip(tqdm(range(steps), desc="fine-tune", unit="step"), batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, steps, steps_per_epoch=1)
        targets = F.one_hot(labels.index_select(0, batch.index), model.config["n_classes"]).float()
        loss, _ = optimization_step(model, model, optimizer, augment(images, batch), targets, clipped, autocast)
        losses.append(loss.detach())
    return torch.stack(losses).tolist()  # read once: no synchronisation per step


def lowest_loss(
    set_factor: Callable[[float], ViT], factors, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> pd.DataFrame:
    """Evaluates the model ``set_factor(factor)`` returns for each factor on ``images`` (the
    validation split), leaves it set to the factor with the lowest loss, and returns every
    factor's loss and accuracy."""
    curve = pd.DataFrame(
        {"factor": float(factor), **split_metrics(set_factor(float(factor)), images, labels, device)}
        for factor in factors
    )
    set_factor(chosen(curve))
    return curve


def chosen(curve: pd.DataFrame) -> float:
    """The factor of a `lowest_loss` curve that it left set."""
    return float(curve["factor"][curve["loss"].idxmin()])


def calibrate_attention(
    model: ViT, images: np.ndarray, labels: np.ndarray, device: torch.device, trained_tokens: int, steps: int = 10
) -> pd.DataFrame:
    """Sets the model's attention scale to the factor with the lowest loss on ``images``
    (the validation split) among 1 to 2 in ``steps`` geometric steps (1 to 1/2 if the model
    now has fewer tokens than ``trained_tokens``); returns every factor's loss and accuracy."""
    tokens = 1 + model.projector.grid[0] * model.projector.grid[1]
    direction = 1 if tokens >= trained_tokens else -1
    return lowest_loss(
        model.set_attention_scale, 2.0 ** (direction * np.linspace(0, 1, steps + 1)), images, labels, device
    )


def interpolate_finetune(
    model: ViT, before: dict[str, torch.Tensor], images: np.ndarray, labels: np.ndarray, device: torch.device, steps=4
) -> pd.DataFrame:
    """WiSE-FT: sets the fine-tuned ``model``'s weights to ``before + share * (fine-tuned -
    before)``, with the share of the fine-tune's change kept (0 to 1 in ``steps`` steps) that
    gives the lowest loss on ``images`` (the validation split); returns every share's loss and
    accuracy."""
    after = {name: weight.detach().clone() for name, weight in model.state_dict().items()}

    def keep(share: float) -> ViT:
        model.load_state_dict({name: torch.lerp(before[name], after[name], share) for name in after})
        return model

    return lowest_loss(keep, np.linspace(0, 1, steps + 1), images, labels, device)


def _patch_grid(model: ViT) -> np.ndarray:
    height, width = model.projector.grid
    return model.projector.pos_embed.detach()[0, 1:].reshape(height, width, -1).float().cpu().numpy()


@dataclass
class Resizing:
    """What the variants are built from, shared by their builds: the trained model, the new size,
    the validation split at it (on which their numbers are chosen), the fine-tune's settings
    (None: skipped); ``built`` holds the variants built so far, ``found`` what their builds chose
    (result keys)."""

    trained: ViT
    size: int
    dataset: DataVersion
    valid_images: np.ndarray
    valid_labels: np.ndarray
    finetune_config: TrainConfig | None
    finetune_steps: int
    device: torch.device
    tracker: Tracker
    built: dict[str, ViT] = field(default_factory=dict)
    found: dict = field(default_factory=dict)

    def resized(self, mode: str = "bicubic") -> ViT:
        """A copy of the trained model, its position embeddings interpolated to the new size."""
        return copy.deepcopy(self.trained).set_image_size(self.size, mode=mode)


def _calibrated(resizing: Resizing) -> ViT:
    model = resizing.resized()
    trained_tokens = 1 + resizing.trained.projector.grid[0] * resizing.trained.projector.grid[1]
    curve = calibrate_attention(model, resizing.valid_images, resizing.valid_labels, resizing.device, trained_tokens)
    resizing.found.update(
        attention_scale=model.config["attention_scale"], attention_calibration=curve.to_dict(orient="records")
    )
    print(f"attention scale chosen on the validation split: {model.config['attention_scale']:.3f}")
    return model


def _finetuned(resizing: Resizing) -> ViT | None:
    if resizing.finetune_config is None:
        return None
    train_images, train_labels = decode_split(resizing.dataset, "train", resizing.size)
    config = replace(resizing.finetune_config, batch_size=min(resizing.finetune_config.batch_size, len(train_images)))
    model = resizing.resized().to(resizing.device)
    losses = finetune(model, train_images, train_labels, config, resizing.finetune_steps, resizing.device)
    for step, loss in enumerate(losses):
        resizing.tracker.scalar("fine-tune loss", f"train @ {resizing.size}", loss, step)
    resizing.found["finetune_losses"] = losses
    return model


def _finetuned_interpolated(resizing: Resizing) -> ViT | None:
    if "finetuned" not in resizing.built:
        return None
    model = copy.deepcopy(resizing.built["finetuned"])
    before = resizing.built["bicubic"].state_dict()  # where the fine-tune started
    curve = interpolate_finetune(model, before, resizing.valid_images, resizing.valid_labels, resizing.device)
    resizing.found.update(finetune_kept=chosen(curve), finetune_interpolation=curve.to_dict(orient="records"))
    print(f"share of the fine-tune's change kept, chosen on the validation split: {chosen(curve):.2f}")
    return model


class Curve(NamedTuple):
    """The validation curve a variant's one number was chosen on, as highres plots it: the result
    key of its points, the plot file's suffix, its x axis, its ClearML title, what the
    plotted model started from and the plot's caption (``{size}``: the new size)."""

    key: str
    suffix: str
    xlabel: str
    title: str
    start: str
    caption: str


@dataclass(frozen=True)
class Variant:
    """One way of running the trained model at the new size: ``name`` in its result keys
    (``test_accuracy_<name>``, ``test_loss_<name>``), ``label`` its row in the tables from a
    result (or the summary's part of one, `summary_part`), ``build`` the model (None: skipped), and,
    where its build chose a number on the validation split, the result key of that number
    (``chose``) and the curve it was chosen on."""

    name: str
    label: Callable[[dict], str]
    meaning: str  # what the row means, for the run's report (``{size}``: the new size)
    build: Callable[[Resizing], ViT | None]
    chose: str | None = None
    curve: Curve | None = None

    def accuracy(self, result: dict) -> float | None:
        return result[f"test_accuracy_{self.name}"]


VARIANTS = {  # in the order built: each may start from those before
    variant.name: variant
    for variant in (
        Variant(
            "bilinear",
            lambda result: "interpolated, bilinear",
            "the same model at {size} px, its position embeddings interpolated bilinearly, no training",
            lambda resizing: resizing.resized("bilinear"),
        ),
        Variant(
            "bicubic",
            lambda result: "interpolated, bicubic",
            "the same, interpolated bicubically (the paper's way)",
            lambda resizing: resizing.resized("bicubic"),
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


def summary_part(result: dict) -> dict:
    """The part of a highres result that a run's summary keeps: the new size, each variant's
    test accuracy and the numbers its label reads."""
    kept = [key for variant in VARIANTS.values() for key in (f"test_accuracy_{variant.name}", variant.chose) if key]
    return {"image_size": result["image_size"], **{key: result[key] for key in kept}}


def finetune_config(saved: dict, params: dict) -> TrainConfig | None:
    """The fine-tune's settings: the training run's where the checkpoint has them, at the new size,
    with highres' learning rate, crop and batch size, no warm-up and no RandAugment or erasing;
    None when ``finetune_steps`` skips it."""
    if params["finetune_steps"] <= 0:
        return None
    return replace(
        TrainConfig(**saved["train_config"]) if "train_config" in saved else TrainConfig(),
        image_size=params["image_size"],
        lr=params["finetune_lr"],
        min_lr=0.0,
        warmup_epochs=0,
        rand_augment=0,
        random_erasing=0.0,
        crop_scale=params["finetune_crop_scale"],
        batch_size=params["finetune_batch_size"],
    )


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


def report_figures(result: dict, table: pd.DataFrame, resizing: Resizing, output_json: Path) -> list[dict]:
    """The accuracy of each variant, the validation curve of each number chosen and the position
    embeddings' similarity before and after the resize: saved next to ``output_json`` and
    reported; returns their ``{"path", "caption"}``."""
    size, native = result["image_size"], result["trained_image_size"]
    shown = table.dropna(subset=["accuracy"])
    bars = grouped_bars_figure(
        list(shown["variant"]),
        {"test accuracy": list(shown["accuracy"])},
        "variant",
        "test accuracy (fraction correct)",
        f"trained at {native} px, evaluated at {size} px",
    )
    figures = {  # suffix: (ClearML title, figure, dpi, caption)
        ".png": (
            "accuracy by variant",
            bars,
            120,
            f"Test accuracy at {size} px of the model trained at {native} px, one bar per way of moving it to the "
            f"new size: position embeddings interpolated bilinearly or bicubically, then with the attention "
            f"sharpened, then fine-tuned at {size} px, then with only part of the fine-tune kept; the first bar is "
            f"the model at its own size, the mark to reach. A missing bar was not run.",
        )
    }
    for variant in VARIANTS.values():
        if variant.curve is not None and result[variant.curve.key]:
            points = pd.DataFrame(result[variant.curve.key])
            figure = factor_figure(
                list(points["factor"]),
                {
                    "validation loss (cross-entropy)": list(points["loss"]),
                    "validation accuracy (fraction correct)": list(points["accuracy"]),
                },
                result[variant.chose],
                variant.curve.xlabel,
                f"{variant.curve.start} at {size} px, trained at {native} px",
            )
            title, caption = f"{variant.curve.title} on the validation split", variant.curve.caption.format(size=size)
            figures[f".{variant.curve.suffix}.png"] = (title, figure, 120, caption)
    grids = {
        f"trained ({native})": _patch_grid(resizing.trained),
        f"bicubic ({size})": _patch_grid(resizing.built["bicubic"]),
    }
    figures[".pos_embed.png"] = (
        "position embedding similarity",
        similarity_figure(grids),
        100,
        f"Cosine similarity between position embeddings, as in the paper's Figure 7: tile (row, column) stands "
        f"for one patch and shows, pixel by pixel, how similar its embedding is to each patch's. Left as trained "
        f"({native} px), right interpolated to {size} px: a bright spot at each tile's own place means the "
        f"embeddings encode position, and interpolation should keep that pattern.",
    )
    for suffix, (title, figure, dpi, _) in figures.items():
        figure.savefig(output_json.with_suffix(suffix), dpi=dpi)
        resizing.tracker.figure(title, figure)
    return [{"path": str(output_json.with_suffix(suffix)), "caption": entry[-1]} for suffix, entry in figures.items()]


class Reference(NamedTuple):
    """The trained model on the test split at its own size."""

    metrics: dict  # accuracy and loss
    correct: np.ndarray  # bool (N,): the images it got right
    predictions: np.ndarray  # int (N,)
    images: np.ndarray  # uint8 (N, S, S, 3) at the trained size


def measure_reference(trained: ViT, dataset: DataVersion, device: torch.device) -> Reference:
    """The reference row: the trained model at its own size, the accuracy every variant is held to."""
    images, labels = decode_split(dataset, "test", trained.image_size[0])
    logits = predict(trained.to(device), images, device)
    return Reference(logit_metrics(logits, labels), correct(logits, labels).numpy(), logits.argmax(1).numpy(), images)


def attention_comparison(
    resizing: Resizing, reference: Reference, images: np.ndarray, labels: np.ndarray, output_json: Path
) -> dict:
    """The attention maps of the images `evaluate` shows (the same seeded sample), at the trained
    size and bicubic at the new one, side by side: whether the model still attends to the object
    after the resize. Saved next to ``output_json`` and reported; returns its ``{"path", "caption"}``."""
    sample = attention_sample(labels, reference.predictions)
    views = {
        f"trained size {resizing.trained.image_size[0]}": (resizing.trained, reference.images[sample]),
        f"bicubic {resizing.size}": (resizing.built["bicubic"], images[sample]),
    }
    figure = attention_figure(views, labels[sample], resizing.dataset.classes)
    path = output_json.with_suffix(".attention_maps.png")
    figure.savefig(path, dpi=100)
    resizing.tracker.figure("attention maps", figure)
    views = (
        f"Left at the trained size, {resizing.trained.image_size[0]} px; right the same images at "
        f"{resizing.size} px with bicubic position embeddings: where the maps still fall on the object, the "
        f"interpolated embeddings still tell the model where each patch is."
    )
    return {"path": str(path), "caption": ATTENTION_CAPTION.format(views=views)}


def build_variants(
    resizing: Resizing, images: np.ndarray, labels: np.ndarray, reference_correct: np.ndarray
) -> dict[str, dict]:
    """Builds each of `VARIANTS` in turn into ``resizing.built``; returns the test metrics of
    those not skipped, against the reference's right answers."""
    metrics = {}
    for name, variant in VARIANTS.items():
        model = variant.build(resizing)
        if model is not None:
            resizing.built[name] = model
            metrics[name] = split_metrics(model, images, labels, resizing.device, reference_correct)
    return metrics


def variant_results(metrics: dict[str, dict], found: dict) -> dict:
    """The result keys of the variants: test accuracy and loss of each (None where skipped), their
    changes against the reference, and what their builds chose with the curves chosen on."""
    return {
        **{f"test_accuracy_{name}": metrics.get(name, NOT_RUN)["accuracy"] for name in VARIANTS},
        **{f"test_loss_{name}": metrics.get(name, NOT_RUN)["loss"] for name in VARIANTS},
        "test_changes": {  # against the reference row, image by image
            name: {key: variant[key] for key in ("gained", "lost", "mcnemar_p")} for name, variant in metrics.items()
        },
        "attention_scale": found["attention_scale"],
        "attention_calibration": found["attention_calibration"],
        "finetune_losses": found.get("finetune_losses", []),
        "finetune_kept": found.get("finetune_kept"),
        "finetune_interpolation": found.get("finetune_interpolation", []),
    }


def highres(
    checkpoint: Path,
    data: str,
    output_json: Path,
    image_size: int = 384,
    finetune_steps: int = 300,
    finetune_lr: float = 0.01,
    finetune_batch_size: int = 64,
    finetune_crop_scale: float = 1.0,
    device: str = "auto",
) -> dict:
    """Runs the variants and returns ``{"image_size", "reference_accuracy" (at the trained size),
    "test_accuracy_<variant>" and "test_loss_<variant>" for each of `VARIANTS` (None where
    skipped), "attention_scale" (its factor), "finetune_kept" (the share of the fine-tune's
    change kept), "test_changes" ({variant: {"gained", "lost", "mcnemar_p"}} against the
    reference), "checkpoint" (the fine-tuned model, else the bicubic one), ...}``; also written
    to ``output_json``."""
    output_json = Path(output_json)
    check_crop_scale(finetune_crop_scale, "--finetune-crop-scale")  # before any work
    device = pick_device(device)
    with open_task(output_json.stem, "testing", output_json.parent, title=f"highres {image_size}") as tracker:
        params = tracker.connect(
            {
                "checkpoint": str(checkpoint),
                "data": data,
                "image_size": image_size,
                "finetune_steps": finetune_steps,
                "finetune_lr": finetune_lr,
                "finetune_batch_size": finetune_batch_size,
                "finetune_crop_scale": finetune_crop_scale,
            }
        )
        size = params["image_size"]
        trained, saved = checkpoints.load_model(Path(params["checkpoint"]))
        dataset = resolve(params["data"])
        images, labels = decode_split(dataset, "test", size)
        reference = measure_reference(trained, dataset, device)
        no_resize_error = refusal(trained, images, device)
        print(f"no resize: {no_resize_error}")

        valid_images, valid_labels = decode_split(dataset, "valid", size)
        config = finetune_config(saved, params)
        resizing = Resizing(
            trained, size, dataset, valid_images, valid_labels, config, params["finetune_steps"], device, tracker
        )
        metrics = build_variants(resizing, images, labels, reference.correct)
        result = {
            "image_size": size,
            "trained_image_size": trained.image_size[0],
            "reference_accuracy": reference.metrics["accuracy"],
            "no_resize_error": no_resize_error,
            **variant_results(metrics, resizing.found),
        }
        table = accuracy_table(result, reference.metrics, metrics)
        print(table.to_string(index=False))
        tracker.table("accuracy by variant", table)
        plots = report_figures(result, table, resizing, output_json)
        plots.append(attention_comparison(resizing, reference, images, labels, output_json))

        kept = resizing.built.get("finetuned_interpolated", resizing.built["bicubic"])  # the fine-tuned, else bicubic
        model_path = checkpoints.save_atomic(
            {"model": kept.state_dict(), "config": kept.config, "classes": dataset.classes},
            output_json.parent / f"model_{size}.pt",
        )
        model_id = tracker.model(model_path, f"vit {size}", kept.config)
        result.update(checkpoint=str(model_path), model_id=model_id, plots=plots)
        tracker.artifact("metrics", {k: v for k, v in result.items() if k not in ("finetune_losses", "plots")})
    result["clearml"] = tracker.session
    write_json(result, output_json)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("highres", __doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt file written by train")
    parser.add_argument("--data", required=True, help="a zip, a folder, a data version folder or a ClearML Dataset id")
    parser.add_argument("--image-size", type=cli.positive_int, default=384, help="the new input size (default: 384)")
    parser.add_argument(
        "--finetune-steps", type=cli.nonnegative_int, default=300, help="SGD steps at the new size; 0 skips (300)"
    )
    parser.add_argument(
        "--finetune-lr", type=cli.positive_float, default=0.01, help="peak SGD learning rate (default: 0.01)"
    )
    parser.add_argument("--finetune-batch-size", type=cli.positive_int, default=64, help="default: 64")
    parser.add_argument(
        "--finetune-crop-scale",
        type=float,
        default=1.0,
        help="smallest crop area of the fine-tune's random-resized crop; 1: whole images, as tested (default: 1)",
    )
    parser.add_argument("--output-json", type=cli.output_file, required=True, help="where the results go")
    parser.add_argument("--device", type=cli.device_name, default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args(argv)
    cli.run(parser, check_source, args.data)
    cli.run(
        parser,
        highres,
        args.checkpoint,
        args.data,
        args.output_json,
        args.image_size,
        args.finetune_steps,
        args.finetune_lr,
        args.finetune_batch_size,
        args.finetune_crop_scale,
        args.device,
    )


if __name__ == "__main__":
    main()
