"""evaluate: a checkpoint on the test split, at its own image size or another one.

Top-1 and top-5 accuracy and loss, per-class precision/recall/F1, a confusion matrix and
the misclassified images, reported to ClearML.

    python -m components.evaluate --checkpoint runs/train/checkpoints/best.pt --data SRC --output-json eval.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from components import checkpoints, cli
from components.atomic import write_json
from components.attention_maps import CAPTION as ATTENTION_CAPTION
from components.attention_maps import attention_figure, attention_sample
from components.data import DataError, check_source, decode_split, resolve, to_input
from components.devices import mixed_precision, pick_device
from components.plots import confusion_figure, image_grid_figure
from components.tracking import open_task


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    to_host: bool = True,
) -> torch.Tensor:
    """Logits (N, K) in float32 for uint8 images (N, H, W, 3), computed on ``device`` and
    returned on the CPU; with ``to_host=False`` left on ``device``, so that the host goes on
    without waiting for the device (the training loop's validation)."""
    model.eval()
    autocast = mixed_precision(device)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_input(torch.as_tensor(images[start : start + batch_size]).to(device))
        with autocast:
            outputs.append(model(batch).float())
    logits = torch.cat(outputs)
    return logits.cpu() if to_host else logits


def accuracy(logits: torch.Tensor, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of images whose label is among the k highest logits."""
    return float(correct(logits, labels, k).double().mean())


def correct(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per image (bool, on the logits' device), whether its label is among the k highest logits
    (ties as ``topk`` breaks them)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == torch.as_tensor(labels, device=logits.device)[:, None]).any(dim=1)


def per_class_report(confusion: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: true)."""
    true_positives = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros_like(true_positives), where=actual > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": actual})


def evaluate(
    checkpoint: Path,
    data: str,
    output_json: Path,
    image_size: int | None = None,
    device: str = "auto",
    split: str = "test",
) -> dict:
    """Evaluates and returns ``{"test_accuracy", "test_top5_accuracy", "test_loss",
    "image_size", "num_images", "per_class", "clearml"}``; also written to ``output_json``."""
    output_json = Path(output_json)
    device = pick_device(device)
    with open_task(output_json.stem, "testing", output_json.parent, title="evaluate") as tracker:
        params = tracker.connect(
            {"checkpoint": str(checkpoint), "data": data, "image_size": image_size or 0, "split": split}
        )
        model, saved = checkpoints.load_model(Path(params["checkpoint"]))
        size = params["image_size"] or model.image_size[0]
        if size != model.image_size[0]:
            print(f"interpolating the position embeddings from {model.image_size[0]} to {size} (bicubic)")
            model.set_image_size(size)
        dataset = resolve(params["data"])
        if "classes" in saved and saved["classes"] != dataset.classes:
            raise DataError(
                f"the checkpoint was trained on the classes {saved['classes']}, the data has {dataset.classes}"
            )
        images, labels = decode_split(dataset, params["split"], size)
        logits = predict(model.to(device), images, device)
        predictions = logits.argmax(1).numpy()
        classes = dataset.classes
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(confusion, (labels, predictions), 1)
        report = per_class_report(confusion, classes)
        result = {
            "test_accuracy": accuracy(logits, labels),
            "test_top5_accuracy": accuracy(logits, labels, k=5),
            "test_loss": F.cross_entropy(logits, torch.from_numpy(labels)).item(),
            "image_size": size,
            "num_images": len(labels),
            "per_class": report.to_dict(orient="records"),
            "plots": [
                {
                    "path": str(output_json.with_suffix(".confusion.png")),
                    "caption": f"Confusion matrix of the {len(labels)} {params['split']} images at {size} px: "
                    "row = the true class, column = the predicted one, the number in a cell counts those images. "
                    "The diagonal holds the correct answers; a dark cell off it names two classes the model "
                    "confuses.",
                }
            ],
        }
        for name in ("test_accuracy", "test_top5_accuracy", "test_loss"):
            tracker.scalar(name.removeprefix("test_"), f"{params['split']} @ {size}", result[name], 0)
        tracker.table("per-class precision, recall, F1", report.round(4))
        figure = confusion_figure(confusion, classes)
        figure.savefig(output_json.with_suffix(".confusion.png"), dpi=120)
        tracker.figure("confusion matrix", figure)
        wrong = np.flatnonzero(predictions != labels)[:32]
        if len(wrong):
            titles = [f"{classes[labels[i]]} -> {classes[predictions[i]]}" for i in wrong]
            tracker.figure("misclassified (true -> predicted)", image_grid_figure(images[wrong], titles))
        sample = attention_sample(labels, predictions)
        figure = attention_figure({f"at {size}": (model, images[sample])}, labels[sample], classes)
        figure.savefig(output_json.with_suffix(".attention_maps.png"), dpi=100)
        tracker.figure("attention maps", figure)
        trained_size = saved["config"]["image_size"][0]
        view = f"At {size} px" + (
            " (the trained size)." if size == trained_size else f", trained at {trained_size} px."
        )
        caption = ATTENTION_CAPTION.format(views=view)
        result["plots"].append({"path": str(output_json.with_suffix(".attention_maps.png")), "caption": caption})
        tracker.artifact("metrics", {k: v for k, v in result.items() if k not in ("per_class", "plots")})
    result["clearml"] = tracker.session
    write_json(result, output_json)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("evaluate", __doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt file written by train")
    parser.add_argument("--data", required=True, help="a zip, a folder, a data version folder or a ClearML Dataset id")
    parser.add_argument(
        "--image-size",
        type=cli.positive_int,
        default=None,
        help="evaluate at this size; other than the checkpoint's, the position embeddings are interpolated "
        "(default: the checkpoint's)",
    )
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="default: test")
    parser.add_argument("--output-json", type=cli.output_file, required=True, help="where the metrics go")
    parser.add_argument("--device", type=cli.device_name, default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args(argv)
    cli.run(parser, check_source, args.data)
    result = cli.run(
        parser, evaluate, args.checkpoint, args.data, args.output_json, args.image_size, args.device, args.split
    )
    print(
        f"{args.split} accuracy {result['test_accuracy']:.4f} (top-5 {result['test_top5_accuracy']:.4f}), "
        f"loss {result['test_loss']:.4f} on {result['num_images']} images at {result['image_size']}"
    )


if __name__ == "__main__":
    main()
