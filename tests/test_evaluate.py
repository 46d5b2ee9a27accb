"""evaluate: its numbers agree with a computation done by hand, from the JPEGs up."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from components.common import checkpoints
from components.evaluate import evaluate, per_class_report
from model import ViT, model_config
from tests.archives import CLASSES, make_layout


@pytest.fixture
def random_checkpoint(tmp_path):
    torch.manual_seed(3)
    model = ViT(**model_config("vit-tiny-test", image_size=32, n_classes=3))
    with torch.no_grad():
        for parameter in model.parameters():  # a model with opinions, not the zero head of the init
            parameter.normal_(0, 0.3)
    path = tmp_path / "model.pt"
    checkpoints.save_atomic(checkpoints.payload(model.state_dict(), model.config, CLASSES), path)
    return path, model.eval()


def by_hand(model: ViT, folder, size: int) -> tuple[float, float]:
    """Accuracy and loss of ``model`` on the test split of ``folder``: each JPEG decoded and
    resized to ``size`` with OpenCV (bicubic up, pixel-area down), scaled to [-1, 1], one batch."""
    rows = [line.split(",") for line in (folder / "headgear.csv").read_text().splitlines()[1:]]
    test_rows = [row for row in rows if row[3] == "test"]
    originals = [np.asarray(Image.open(folder / relative).convert("RGB")) for _, relative, _, _ in test_rows]
    interpolation = cv2.INTER_AREA if originals[0].shape[0] > size else cv2.INTER_CUBIC
    pixels = np.stack([cv2.resize(image, (size, size), interpolation=interpolation) for image in originals])
    labels = torch.tensor([int(row[0]) for row in test_rows])
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    loss = -logits.log_softmax(1)[torch.arange(len(labels)), labels].mean().item()
    return (logits.argmax(1) == labels).float().mean().item(), loss


def test_evaluate_agrees_with_a_hand_computation(tmp_path, random_checkpoint):
    path, model = random_checkpoint
    folder = make_layout(tmp_path / "data", per_split=(4, 3, 5))
    result = evaluate(path, str(folder), tmp_path / "eval" / "evaluate.json", device="cpu")

    accuracy, loss = by_hand(model, folder, 32)
    assert result["num_images"] == 15 and result["image_size"] == 32
    assert result["test_accuracy"] == pytest.approx(accuracy)
    assert result["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert result["test_top5_accuracy"] == 1.0  # three classes
    assert json.loads((tmp_path / "eval" / "evaluate.json").read_text())["test_accuracy"] == result["test_accuracy"]
    assert (tmp_path / "eval" / "evaluate.clearml-offline.zip").is_file()


def test_evaluate_at_another_size_is_the_model_resized_by_hand(tmp_path, random_checkpoint):
    # The images are decoded at 48 and the position embeddings interpolated to the 6x6 grid,
    # exactly as set_image_size(48) does: the numbers are that model's on those images.
    path, model = random_checkpoint
    folder = make_layout(tmp_path / "data", per_split=(4, 3, 5))
    result = evaluate(path, str(folder), tmp_path / "eval48.json", image_size=48, device="cpu")

    accuracy, loss = by_hand(model.set_image_size(48), folder, 48)
    assert result["image_size"] == 48
    assert result["test_accuracy"] == pytest.approx(accuracy)
    assert result["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_per_class_precision_recall_f1_by_hand():
    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # rows: true class
    report = per_class_report(confusion, ["a", "b", "c"])
    assert report["precision"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert report["recall"].tolist() == pytest.approx([0.75, 0.5, 0.0])
    assert report["f1"].tolist() == pytest.approx([2 * 0.75 / 1.75, 2 * (2 / 3 * 0.5) / (2 / 3 + 0.5), 0.0])
    assert report["support"].tolist() == [4, 4, 0]


def test_a_checkpoint_for_other_classes_is_refused(tmp_path, random_checkpoint):
    path, _ = random_checkpoint
    folder = make_layout(tmp_path / "data", per_split=(2, 2, 2), classes=["A", "B", "C"])
    with pytest.raises(ValueError, match="trained on the classes"):
        evaluate(path, str(folder), tmp_path / "e.json", device="cpu")
