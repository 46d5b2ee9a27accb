"""highres: the model trained at 224 evaluated at 384, the paper's way (section 3.2).

Side by side on the test split, with the images resized to the new size:

1. no resize: the model refuses the new size with its own error;
2. position embeddings interpolated in 2D, bilinear;
3. interpolated, bicubic (the default);
4. bicubic, and the attention logits multiplied by the factor (1 to 2, or 1 to 1/2 when the
   size shrinks) that gives the lowest loss on the validation split at the new size: with
   577 tokens instead of 197 a briefly trained model does better with sharper attention
   than it was trained with, a well-trained one about 1 (benchmarks/RESULTS.md); no
   gradient step, one number chosen;
5. bicubic and then fine-tuned at the new size for a short schedule, as the paper does
   (SGD with momentum 0.9, gradient clipping, cosine decay; ``--finetune-steps 0`` skips it),
   on whole training images and flips: the training run's random-resized crops show objects
   larger than the test images do, and a fine-tune at the test size is where to undo that
   (Touvron et al. 2019, FixRes); ``--finetune-crop-scale`` crops again;
6. the fine-tuned weights interpolated back toward the bicubic ones, keeping the share of the
   fine-tune's change (0, 1/4, ..., 1) that gives the lowest loss on the validation split
   (WiSE-FT, Wortsman et al. 2022): a short fine-tune on a few thousand images also fits them
   a little too closely, and part of the way back keeps what the long training run learned (on
   the H200 checkpoint of benchmarks/RESULTS.md: three quarters kept, a lower test loss in each
   of four fine-tunes and 0.3 points more accuracy on average). This model is the one saved;

and the accuracy at the training size as the reference row. Each variant's row also counts the
test images it gets right that the reference got wrong and the reverse, with McNemar's exact
p-value: on 500 test images one standard error of accuracy is about 1.5 points, so whether
384 is better or worse than 224 is a question for the paired count, not the difference.

    python -m components.highres --checkpoint best.pt --data SRC --output-json highres.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from components import checkpoints
from components.atomic import write_json
from components.augment import augment, endless_batches
from components.data import DataError, decode_split, resolve, to_input
from components.devices import pick_device
from components.evaluate import accuracy, correct, predict
from components.plots import factor_figure, grouped_bars_figure, similarity_figure
from components.presets import TrainConfig, check_crop_scale
from components.tracking import open_task
from components.train import learning_rate
from model import ViT

VARIANTS = ("bilinear", "bicubic", "bicubic_calibrated", "finetuned", "finetuned_interpolated")
NOT_RUN = {"accuracy": None, "loss": None}


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
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    batches = endless_batches(len(images), config, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    for step, batch in zip(tqdm(range(steps), desc="fine-tune", unit="step"), batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, steps, steps_per_epoch=1)
        with autocast:
            logits = model(augment(images, batch))
        loss = F.cross_entropy(logits.float(), labels.index_select(0, batch.index))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or 1.0)
        optimizer.step()
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
        native = trained.image_size[0]
        dataset = resolve(params["data"])
        images, labels = decode_split(dataset, "test", size)

        native_images, native_labels = decode_split(dataset, "test", native)
        native_logits = predict(trained.to(device), native_images, device)
        reference = logit_metrics(native_logits, native_labels)
        reference_correct = correct(native_logits, native_labels).numpy()

        try:  # 1. as trained: the model must refuse, and say how to fix it
            trained.to(device).eval()(to_input(torch.from_numpy(images[:1]).to(device)))
            no_resize_error = None
        except ValueError as error:
            no_resize_error = str(error)
        print(f"no resize: {no_resize_error}")

        variants, metrics = {}, {}
        for name, mode in (("bilinear", "bilinear"), ("bicubic", "bicubic"), ("bicubic_calibrated", "bicubic")):
            model, _ = checkpoints.load_model(Path(params["checkpoint"]))
            variants[name] = model.set_image_size(size, mode=mode)
        trained_tokens = 1 + trained.projector.grid[0] * trained.projector.grid[1]
        valid_images, valid_labels = decode_split(dataset, "valid", size)
        calibration = calibrate_attention(  # 4.
            variants["bicubic_calibrated"], valid_images, valid_labels, device, trained_tokens
        )
        attention_scale = variants["bicubic_calibrated"].config["attention_scale"]
        print(f"attention scale chosen on the validation split: {attention_scale:.3f}")
        for name, model in variants.items():  # 2., 3. and 4.
            metrics[name] = split_metrics(model, images, labels, device, reference_correct)

        finetune_losses, interpolation, kept = [], None, None
        result_model = variants["bicubic"]
        if params["finetune_steps"] > 0:  # 5.
            train_images, train_labels = decode_split(dataset, "train", size)
            config = replace(
                TrainConfig(**saved["train_config"]) if "train_config" in saved else TrainConfig(),
                image_size=size,
                lr=params["finetune_lr"],
                min_lr=0.0,
                warmup_epochs=0,
                rand_augment=0,
                random_erasing=0.0,
                crop_scale=params["finetune_crop_scale"],
                batch_size=min(params["finetune_batch_size"], len(train_images)),
            )
            model, _ = checkpoints.load_model(Path(params["checkpoint"]))
            model.set_image_size(size).to(device)
            before = {name: weight.detach().clone() for name, weight in model.state_dict().items()}
            finetune_losses = finetune(model, train_images, train_labels, config, params["finetune_steps"], device)
            for step, loss in enumerate(finetune_losses):
                tracker.scalar("fine-tune loss", f"train @ {size}", loss, step)
            metrics["finetuned"] = split_metrics(model, images, labels, device, reference_correct)
            interpolation = interpolate_finetune(model, before, valid_images, valid_labels, device)  # 6.
            kept = chosen(interpolation)
            print(f"share of the fine-tune's change kept, chosen on the validation split: {kept:.2f}")
            metrics["finetuned_interpolated"] = split_metrics(model, images, labels, device, reference_correct)
            result_model = model

        table = pd.DataFrame(
            [
                {"variant": f"reference: trained size {native}", "image_size": native, **reference},
                {"variant": "no resize", "image_size": size, "accuracy": None, "loss": None},
                {"variant": "interpolated, bilinear", "image_size": size, **metrics["bilinear"]},
                {"variant": "interpolated, bicubic", "image_size": size, **metrics["bicubic"]},
                {
                    "variant": f"bicubic, attention x{attention_scale:.2f}",
                    "image_size": size,
                    **metrics["bicubic_calibrated"],
                },
                {
                    "variant": f"bicubic + fine-tuned {params['finetune_steps']} steps"
                    if params["finetune_steps"] > 0
                    else "bicubic + fine-tuned (skipped: --finetune-steps 0)",
                    "image_size": size,
                    **metrics.get("finetuned", NOT_RUN),
                },
                {
                    "variant": f"fine-tuned, x{kept:.2f} of its change kept"
                    if kept is not None
                    else "fine-tuned, part of its change kept (skipped)",
                    "image_size": size,
                    **metrics.get("finetuned_interpolated", NOT_RUN),
                },
            ]
        ).astype({"gained": "Int64", "lost": "Int64"})
        print(table.to_string(index=False))
        tracker.table("accuracy by variant", table)
        shown = table.dropna(subset=["accuracy"])
        figure = grouped_bars_figure(
            list(shown["variant"]),
            {"test accuracy": list(shown["accuracy"])},
            "variant",
            "test accuracy (fraction correct)",
            f"trained at {native} px, evaluated at {size} px",
        )
        figure.savefig(output_json.with_suffix(".png"), dpi=120)
        tracker.figure("accuracy by variant", figure)
        captions = {
            ".png": f"Test accuracy at {size} px of the model trained at {native} px, one bar per way of moving it "
            f"to the new size: position embeddings interpolated bilinearly or bicubically, then with the attention "
            f"sharpened, then fine-tuned at {size} px, then with only part of the fine-tune kept; the first bar is "
            f"the model at its own size, the mark to reach. A missing bar was not run.",
            ".attention.png": "How the attention scale was chosen: validation loss and accuracy at "
            f"{size} px (bicubic position embeddings) with the attention logits multiplied by each factor; the "
            "dashed line marks the factor with the lowest loss, used from then on.",
            ".interpolation.png": "How much of the fine-tune was kept: validation loss and accuracy with the "
            "weights moved from the bicubic model (0) to the fine-tuned one (1); the dashed line marks the share "
            "with the lowest loss, which is the saved model.",
            ".pos_embed.png": f"Cosine similarity between position embeddings, as in the paper's Figure 7: tile "
            f"(row, column) stands for one patch and shows, pixel by pixel, how similar its embedding is to "
            f"each patch's. Left as trained ({native} px), right interpolated to {size} px: a bright spot at each "
            f"tile's own place means the embeddings encode position, and interpolation should keep that pattern.",
        }
        curves = {  # suffix: (curve, x axis, ClearML title, plot title)
            "attention": (
                calibration,
                "attention logits multiplied by (x)",
                "attention scale",
                f"bicubic at {size} px, trained at {native} px",
            )
        }
        if interpolation is not None:
            curves["interpolation"] = (
                interpolation,
                "share of the fine-tune's change kept (0 to 1)",
                "fine-tune kept",
                f"fine-tuned at {size} px, trained at {native} px",
            )
        for suffix, (curve, xlabel, name, title) in curves.items():
            figure = factor_figure(
                list(curve["factor"]),
                {
                    "validation loss (cross-entropy)": list(curve["loss"]),
                    "validation accuracy (fraction correct)": list(curve["accuracy"]),
                },
                chosen(curve),
                xlabel,
                title,
            )
            figure.savefig(output_json.with_suffix(f".{suffix}.png"), dpi=120)
            tracker.figure(f"{name} on the validation split", figure)
        similarity = similarity_figure(
            {f"trained ({native})": _patch_grid(trained), f"bicubic ({size})": _patch_grid(variants["bicubic"])}
        )
        similarity.savefig(output_json.with_suffix(".pos_embed.png"), dpi=100)
        tracker.figure("position embedding similarity", similarity)

        model_path = checkpoints.save_atomic(
            {"model": result_model.state_dict(), "config": result_model.config, "classes": dataset.classes},
            output_json.parent / f"model_{size}.pt",
        )
        model_id = tracker.model(model_path, f"vit {size}", result_model.config)
        result = {
            "image_size": size,
            "trained_image_size": native,
            "reference_accuracy": reference["accuracy"],
            "no_resize_error": no_resize_error,
            **{f"test_accuracy_{name}": metrics.get(name, NOT_RUN)["accuracy"] for name in VARIANTS},
            **{f"test_loss_{name}": metrics.get(name, NOT_RUN)["loss"] for name in VARIANTS},
            "test_changes": {  # against the reference row, image by image
                name: {key: variant[key] for key in ("gained", "lost", "mcnemar_p")}
                for name, variant in metrics.items()
            },
            "attention_scale": attention_scale,
            "attention_calibration": calibration.to_dict(orient="records"),
            "finetune_losses": finetune_losses,
            "finetune_kept": kept,
            "finetune_interpolation": [] if interpolation is None else interpolation.to_dict(orient="records"),
            "checkpoint": str(model_path),
            "model_id": model_id,
            "plots": [
                {"path": str(output_json.with_suffix(suffix)), "caption": captions[suffix]}
                for suffix in (".png", *(f".{name}.png" for name in curves), ".pos_embed.png")
            ],
        }
        tracker.artifact("metrics", {k: v for k, v in result.items() if k not in ("finetune_losses", "plots")})
    result["clearml"] = tracker.session
    write_json(result, output_json)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt file written by train")
    parser.add_argument("--data", required=True, help="a zip, a folder, a data version folder or a ClearML Dataset id")
    parser.add_argument("--image-size", type=int, default=384, help="the new input size (default: 384)")
    parser.add_argument("--finetune-steps", type=int, default=300, help="SGD steps at the new size; 0 skips (300)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="peak SGD learning rate (default: 0.01)")
    parser.add_argument("--finetune-batch-size", type=int, default=64, help="default: 64")
    parser.add_argument(
        "--finetune-crop-scale",
        type=float,
        default=1.0,
        help="smallest crop area of the fine-tune's random-resized crop; 1: whole images, as tested (default: 1)",
    )
    parser.add_argument("--output-json", type=Path, required=True, help="where the results go")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args(argv)
    try:
        highres(
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
    except (DataError, ValueError, FileNotFoundError) as error:
        parser.exit(2, f"highres: error: {error}\n")


if __name__ == "__main__":
    main()
