"""What a model's logits on a split say: predictions, accuracy, loss, and how two models'
right answers differ image by image."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from components.common.devices import mixed_precision
from components.common.images import to_input
from model import ViT


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
    of them alone gets right would split at least this unevenly. On a few hundred test images a
    few points of accuracy can be chance; this says how likely."""
    changed, fewer = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(changed, k) for k in range(fewer + 1)) / 2**changed)
