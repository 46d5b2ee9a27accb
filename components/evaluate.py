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

from components.common import checkpoints, cli
from components.common.atomic import write_json
from components.common.attention_maps import CAPTION as ATTENTION_CAPTION
from components.common.attention_maps import attention_figure, attention_sample
from components.common.data import check_source, resolve
from components.common.devices import pick_device
from components.common.errors import DataError
from components.common.images import decode_split
from components.common.metrics import accuracy, predict
from components.common.plots import confusion_figure, image_grid_figure
from components.common.presets import check_image_size
from components.common.tracking import open_task
from model import ViT


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
    checkpoint: str | Path,
    data: str,
    output_json: Path,
    image_size: int | None = None,
    device: str = "auto",
    split: str = "test",
) -> dict:
    """Evaluates and returns ``{"test_accuracy", "test_top5_accuracy", "test_loss",
    "image_size", "num_images", "per_class", "plots", "clearml"}``; also written to ``output_json``."""
    output_json = Path(output_json)
    device = pick_device(device)
    with open_task(output_json.stem, "testing", output_json.parent, title="evaluate") as tracker:
        params = tracker.connect(
            {"checkpoint": str(checkpoint), "data": data, "image_size": image_size or 0, "split": split}
        )
        model, saved = checkpoints.load_model(params["checkpoint"])
        trained_size = checkpoints.side(model)
        size = params["image_size"] or trained_size
        if size != trained_size:
            print(f"interpolating the position embeddings from {trained_size} to {size} (bicubic)")
            model.set_image_size(size)
        dataset = resolve(params["data"])
        if "classes" in saved and saved["classes"] != dataset.classes:
            raise DataError(
                f"the checkpoint was trained on the classes {saved['classes']}, the data has {dataset.classes}"
            )
        images, labels = decode_split(dataset, params["split"], size)
        logits = predict(model.to(device), images, device)
        result, confusion = split_results(logits, labels, dataset.classes, params["split"], size)
        tracker.table("per-class precision, recall, F1", pd.DataFrame(result["per_class"]).round(4))
        for name in ("test_accuracy", "test_top5_accuracy", "test_loss"):
            tracker.scalar(name.removeprefix("test_"), f"{params['split']} @ {size}", result[name], 0)
        view = f"At {size} px" + (
            " (the trained size)." if size == trained_size else f", trained at {trained_size} px."
        )
        predictions = logits.argmax(1).numpy()
        plots = [
            confusion_plot(confusion, dataset.classes, params["split"], size, output_json, tracker),
            where_it_looks(model, images, labels, predictions, dataset.classes, view, output_json, tracker),
        ]
        show_misclassified(images, labels, predictions, dataset.classes, tracker)
        result["plots"] = plots
        tracker.artifact("metrics", {k: v for k, v in result.items() if k not in ("per_class", "plots")})
    result["clearml"] = tracker.session
    write_json(result, output_json)
    return result


def split_results(
    logits: torch.Tensor, labels: np.ndarray, classes: list[str], split: str, size: int
) -> tuple[dict, np.ndarray]:
    """The numbers of a split: accuracy (top-1, top-5), loss, per-class report; and its confusion matrix."""
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, logits.argmax(1).numpy()), 1)
    result = {
        "test_accuracy": accuracy(logits, labels),
        "test_top5_accuracy": accuracy(logits, labels, k=5),
        "test_loss": F.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "image_size": size,
        "num_images": len(labels),
        "per_class": per_class_report(confusion, classes).to_dict(orient="records"),
    }
    return result, confusion


def confusion_plot(confusion: np.ndarray, classes: list[str], split: str, size: int, output_json: Path, tracker):
    path = output_json.with_suffix(".confusion.png")
    figure = confusion_figure(confusion, classes)
    figure.savefig(path, dpi=120)
    tracker.figure("confusion matrix", figure)
    caption = (
        f"Confusion matrix of the {int(confusion.sum())} {split} images at {size} px: row = the true class, column = "
        "the predicted one, the number in a cell counts those images. The diagonal holds the correct answers; a dark "
        "cell off it names two classes the model confuses."
    )
    return {"path": str(path), "caption": caption}


def where_it_looks(
    model: ViT,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
    view: str,
    output_json: Path,
    tracker,
) -> dict:
    """The attention maps of a seeded sample of the split, half of it misclassified where there
    are enough; ``view`` says in the caption at what size they are shown."""
    path = output_json.with_suffix(".attention_maps.png")
    sample = attention_sample(labels, predictions)
    figure = attention_figure({f"at {checkpoints.side(model)}": (model, images[sample])}, labels[sample], classes)
    figure.savefig(path, dpi=100)
    tracker.figure("attention maps", figure)
    return {"path": str(path), "caption": ATTENTION_CAPTION.format(views=view)}


def show_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, classes: list[str], tracker):
    wrong = np.flatnonzero(predictions != labels)[:32]
    if len(wrong):
        titles = [f"{classes[labels[i]]} -> {classes[predictions[i]]}" for i in wrong]
        tracker.figure("misclassified (true -> predicted)", image_grid_figure(images[wrong], titles))


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
    cli.add_device_flag(parser)
    args = parser.parse_args(argv)
    if args.image_size:
        patch = cli.run(parser, checkpoints.patch_size, args.checkpoint)
        cli.run(parser, check_image_size, args.image_size, patch, "--image-size")
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
