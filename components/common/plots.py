"""The matplotlib figures the components report to ClearML and the local report embeds. Each
has a title and labelled axes; a legend only where there is more than one series."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: agents and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def class_counts_figure(per_class: dict[str, dict[str, int]]):
    classes = sorted({label for counts in per_class.values() for label in counts})
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 4), layout="constrained")
    bottom = np.zeros(len(classes))
    for split, counts in per_class.items():
        values = np.array([counts.get(label, 0) for label in classes])
        axis.bar(classes, values, bottom=bottom, label=split)
        bottom += values
    axis.set_ylabel("images")
    axis.set_title("images per class, stacked by split")
    axis.tick_params(axis="x", rotation=75, labelsize=7)
    axis.legend()
    return figure


def image_grid_figure(images: np.ndarray, titles: list[str], columns: int = 8):
    """uint8 (N, H, W, 3) images in a grid with a title each."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(image)
        axis.set_title(title, fontsize=6)
    figure.tight_layout()
    return figure


def curves_figure(panels: dict[str, dict[str, list[float]]], xlabel: str, title: str, x: list[float] | None = None):
    """One panel per y-axis label of ``panels``, each with line plots of equally long series
    against ``x`` (default 1, 2, ...)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False, layout="constrained")
    for axis, (ylabel, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            axis.plot(x or range(1, len(values) + 1), values, marker=".", label=name)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    return figure


def confusion_figure(matrix: np.ndarray, classes: list[str]):
    size = max(5, 0.4 * len(classes))
    figure, axis = plt.subplots(figsize=(size + 1, size), layout="constrained")
    shown = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
    axis.set_yticks(range(len(classes)), classes, fontsize=6)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(f"test images by true and predicted class ({int(matrix.sum())} images)")
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            axis.text(
                column,
                row,
                int(count),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if count > matrix.max() / 2 else "black",
            )
    figure.colorbar(shown, ax=axis, shrink=0.7, label="images")
    return figure


def grouped_bars_figure(groups: list[str], bars: dict[str, list[float]], xlabel: str, ylabel: str, title: str):
    """One group of bars per entry of ``groups``, one bar per key of ``bars`` (named in a
    legend beside the axes, where it covers none of them)."""
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(bars)) / 2), 4), layout="constrained")
    width = 0.8 / max(1, len(bars))
    positions = np.arange(len(groups))
    for i, (name, values) in enumerate(bars.items()):
        axis.bar(positions + i * width - 0.4 + width / 2, values, width, label=name)
    axis.set_xticks(positions, groups, rotation=30, ha="right", fontsize=7)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    if len(bars) > 1:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def similarity_figure(grids: dict[str, np.ndarray]):
    """The paper's Figure 7 (centre): for each patch position, the cosine similarity of its
    position embedding to every other one. ``grids`` maps a title to (h, w, D) embeddings."""
    figure, all_axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 5.4), squeeze=False, layout="constrained")
    for axes_title, axis in zip(grids, all_axes[0]):
        grid = grids[axes_title]
        h, w, _ = grid.shape
        flat = grid.reshape(h * w, -1)
        flat = flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-12)
        similarity = (flat @ flat.T).reshape(h, w, h, w)
        # one small h x w map per patch, tiled in the patch's place
        tiles = np.full((h * (h + 1), w * (w + 1)), np.nan)
        for r in range(h):
            for c in range(w):
                tiles[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = similarity[r, c]
        shown = axis.imshow(tiles, cmap="viridis", vmin=-1, vmax=1)
        axis.set_title(f"{axes_title}: {h}x{w} patches")
        # a tick at the centre of each tile, numbered as the patch it stands for
        axis.set_xticks(np.arange(w) * (w + 1) + (w - 1) / 2, range(1, w + 1), fontsize=6)
        axis.set_yticks(np.arange(h) * (h + 1) + (h - 1) / 2, range(1, h + 1), fontsize=6)
        axis.tick_params(length=0)
        axis.set_xlabel("patch column")
        axis.set_ylabel("patch row")
    figure.colorbar(shown, ax=all_axes[0], shrink=0.8, label="cosine similarity")
    figure.suptitle("position-embedding similarity: each tile is one patch's similarity to every patch")
    return figure


def factor_figure(factors: list[float], metrics: dict[str, list[float]], chosen: float, xlabel: str, title: str):
    """One panel per metric (e.g. validation loss and accuracy) against a factor chosen on them
    (the attention scale, the share of the fine-tune kept), the chosen factor marked."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False, layout="constrained")
    for axis, (name, values) in zip(axes[0], metrics.items()):
        axis.plot(factors, values, marker=".")
        axis.axvline(chosen, color="grey", linestyle="--")
        right_half = chosen > (min(factors) + max(factors)) / 2  # the label goes where there is room
        axis.annotate(
            f"chosen x{chosen:.2f}",
            (chosen, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-3 if right_half else 3, -12),
            textcoords="offset points",
            ha="right" if right_half else "left",
            fontsize=7,
            color="grey",
        )
        axis.set_xlabel(xlabel)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return figure
