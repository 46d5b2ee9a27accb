"""Attention maps of test images: where the class token looks, overlaid on the images.

For a fixed, seeded sample of test images, some classified correctly and some not, each
image with its attention rollout over all blocks (Abnar and Zuidema, 2020) and the last
block's class-token attention per head (`model.attention_maps`). Several views of the same
images (the model at its trained size and interpolated to 384) are drawn side by side, so
whether the interpolated position embeddings still let the model attend to the object can be
seen at a glance. The sample depends only on the labels and the predictions at the trained
size, so evaluate and highres pick the same images.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import cm, colors

from components.common.images import to_input
from components.common.plots import plt  # with the headless backend plots chooses
from model import ViT
from model.attention_maps import attention_maps

SAMPLE_SIZE = 8
SAMPLE_SEED = 0
COLOUR_MAP = "inferno"
CAPTION = (
    "Where the model looks: a fixed sample of test images (correct ones first, then misclassified ones; the "
    "title gives the true class and the prediction, green when right), each with its attention rollout over "
    "all blocks (how much the class token draws, through every layer, on each patch) and the last block's "
    "class-token attention per head, bright where attention is high. {views}"
)


def attention_sample(
    labels: np.ndarray, predictions: np.ndarray, count: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED
) -> np.ndarray:
    """Indices of ``count`` images, half of them misclassified where there are enough (else
    more of the others): the correct ones first, each part in index order. The same labels
    and predictions give the same indices."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    right, wrong = np.flatnonzero(predictions == labels), np.flatnonzero(predictions != labels)
    n_right = min(len(right), count - min(len(wrong), count // 2))
    n_wrong = min(len(wrong), count - n_right)
    rng = np.random.default_rng(seed)
    parts = (np.sort(rng.choice(indices, n, replace=False)) for indices, n in ((right, n_right), (wrong, n_wrong)))
    return np.concatenate(list(parts)).astype(np.int64)


def attention_figure(views: dict[str, tuple[ViT, np.ndarray]], labels: np.ndarray, classes: list[str]):
    """One row per image, one group of columns per view: ``views`` maps a title (e.g.
    "trained size 224") to a model and the sample's uint8 images (n, H, W, 3) at that model's
    size. Each group shows the image with its rollout overlaid, then the last block's heads;
    each map is scaled to its own maximum (one colour bar). Titles give the true class and the
    view's prediction (green: correct, red: wrong)."""
    maps = {title: _maps(model, images) for title, (model, images) in views.items()}
    n_heads = {title: result["last_block"].shape[1] for title, result in maps.items()}
    columns = sum(1 + heads for heads in n_heads.values())
    figure = plt.figure(figsize=(1.7 * columns + 1.0, 1.9 * len(labels) + 0.8), layout="constrained")
    groups = np.atleast_1d(figure.subfigures(1, len(views), width_ratios=[1 + n for n in n_heads.values()]))
    for group, (title, (model, images)) in zip(groups, views.items()):
        result = maps[title]
        axes = group.subplots(len(labels), 1 + n_heads[title], squeeze=False)
        blocks = len(model.blocks)
        group.suptitle(f"{title}: rollout over {blocks} blocks | last block, per head", fontsize=9)
        for row, (image, label) in enumerate(zip(images, labels)):
            predicted = int(result["predictions"][row])
            panels = [result["rollout"][row], *result["last_block"][row]]
            for column, (axis, attention) in enumerate(zip(axes[row], panels)):
                _overlay(axis, image, attention)
                if column == 0:
                    axis.set_title(
                        f"true {classes[label]}\npredicted {classes[predicted]}",
                        fontsize=7,
                        color="tab:green" if predicted == label else "tab:red",
                    )
                elif row == 0:
                    axis.set_title(f"head {column}", fontsize=7)
    scale = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=COLOUR_MAP)
    figure.colorbar(scale, ax=groups[-1].axes, shrink=0.5, label="attention / the map's maximum")
    return figure


def _maps(model: ViT, images: np.ndarray) -> dict[str, np.ndarray]:
    device = next(model.parameters()).device
    result = attention_maps(model, to_input(torch.from_numpy(np.ascontiguousarray(images)).to(device)))
    return {
        "predictions": result["logits"].argmax(1).cpu().numpy(),
        "rollout": result["rollout"].cpu().numpy(),
        "last_block": result["last_block"].cpu().numpy(),
    }


def _overlay(axis, image: np.ndarray, attention: np.ndarray) -> None:
    height, width = image.shape[:2]
    axis.imshow(image)
    axis.imshow(
        attention / max(float(attention.max()), 1e-12),
        cmap=COLOUR_MAP,
        vmin=0,
        vmax=1,
        alpha=0.55,
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),  # on the pixels imshow drew the image on
        interpolation="bilinear",
    )
    axis.axis("off")
