"""The figures of a model moved to another image size (`components.highres`): the accuracy of
each way of moving it, the validation curves its chosen numbers came from, the position
embeddings' similarity before and after, and where it looks at both sizes."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from components.common import checkpoints
from components.common.attention_maps import CAPTION as ATTENTION_CAPTION
from components.common.attention_maps import attention_figure, attention_sample
from components.common.plots import factor_figure, grouped_bars_figure, similarity_figure
from components.common.tracking import Tracker
from model import ViT


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


def _patch_grid(model: ViT) -> np.ndarray:
    height, width = model.projector.grid
    return model.projector.pos_embed.detach()[0, 1:].reshape(height, width, -1).float().cpu().numpy()


def report_figures(
    result: dict,
    table: pd.DataFrame,
    curves: list[tuple[Curve, str]],
    trained: ViT,
    bicubic: ViT,
    output_json: Path,
    tracker: Tracker,
) -> list[dict]:
    """The accuracy of each variant (``table``), the validation curve of each number chosen
    (``curves``: each with the result key of its number) and the position embeddings'
    similarity before and after the resize: saved next to ``output_json`` and reported;
    returns their ``{"path", "caption"}``."""
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
    for curve, chose in curves:
        if result[curve.key]:
            figure = _curve_figure(pd.DataFrame(result[curve.key]), result[chose], curve, size, native)
            title, caption = f"{curve.title} on the validation split", curve.caption.format(size=size)
            figures[f".{curve.suffix}.png"] = (title, figure, 120, caption)
    grids = {
        f"trained ({native})": _patch_grid(trained),
        f"bicubic ({size})": _patch_grid(bicubic),
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
        tracker.figure(title, figure)
    return [{"path": str(output_json.with_suffix(suffix)), "caption": entry[-1]} for suffix, entry in figures.items()]


def _curve_figure(points: pd.DataFrame, chosen: float, curve: Curve, size: int, native: int):
    losses = {
        "validation loss (cross-entropy)": list(points["loss"]),
        "validation accuracy (fraction correct)": list(points["accuracy"]),
    }
    title = f"{curve.start} at {size} px, trained at {native} px"
    return factor_figure(list(points["factor"]), losses, chosen, curve.xlabel, title)


def attention_comparison(
    trained: tuple[ViT, np.ndarray, np.ndarray],
    bicubic: tuple[ViT, np.ndarray],
    labels: np.ndarray,
    classes: list[str],
    output_json: Path,
    tracker: Tracker,
) -> dict:
    """The attention maps of the images `evaluate` shows (the same seeded sample, chosen from the
    trained model's ``predictions``), at the trained size and bicubic at the new one, side by side:
    whether the model still attends to the object after the resize. ``trained``: (model, its test
    images, its predictions); ``bicubic``: (model, its test images). Saved next to
    ``output_json`` and reported; returns its ``{"path", "caption"}``."""
    (model, trained_images, predictions), (resized, images) = trained, bicubic
    sample = attention_sample(labels, predictions)
    native, size = checkpoints.side(model), checkpoints.side(resized)
    views = {f"trained size {native}": (model, trained_images[sample]), f"bicubic {size}": (resized, images[sample])}
    figure = attention_figure(views, labels[sample], classes)
    path = output_json.with_suffix(".attention_maps.png")
    figure.savefig(path, dpi=100)
    tracker.figure("attention maps", figure)
    views = (
        f"Left at the trained size, {native} px; right the same images at {size} px with bicubic position "
        f"embeddings: where the maps still fall on the object, the interpolated embeddings still tell the model "
        f"where each patch is."
    )
    return {"path": str(path), "caption": ATTENTION_CAPTION.format(views=views)}
