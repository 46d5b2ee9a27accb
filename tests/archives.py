"""Archives in the headgear layout made of real images, for the tests to prepare, train and
evaluate on: small three-class folders of coloured noise (``make_layout``), and ten classes
of coloured shapes that a small ViT learns in seconds (``make_shapes_archive``)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["BASEBALL CAP", "BERET", "ZUCCHETTO"]


def write_image(path: Path, seed: int, size: int = 40, mode: str = "RGB", fmt: str = "JPEG") -> None:
    """A real image whose colour depends on the class (so a model can learn it) plus noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(seed % 3) * 100, 80, 200 - (seed % 3) * 90], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)


def make_layout(root: Path, per_split=(8, 3, 3), classes=CLASSES, csv_name="headgear.csv", extra_rows=()) -> Path:
    """A folder in the headgear archive's layout with a CSV; returns the folder."""
    rows = ["class id,filepaths,labels,data set"]
    for split_index, (split, count) in enumerate(zip(("train", "valid", "test"), per_split)):
        for class_id, label in enumerate(classes):
            for i in range(count):
                relative = f"{split}/{label}/{i + 1:03d}.jpg"
                write_image(root / relative, seed=class_id + 3 * (i + 1000 * split_index))  # no image twice
                rows.append(f"{class_id},{relative},{label},{split}")
    rows.extend(extra_rows)
    if csv_name:
        (root / csv_name).write_text("\n".join(rows) + "\n")
    (root / "EfficientNetB0-headgear.h5").write_bytes(b"not an image, ignored")
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


# Ten classes a ViT tells apart only by looking: each a colour and a shape, drawn at a random
# place and size on a noisy background, as 64x64 JPEGs (the smoke preset trains at 32, its
# high-resolution checks go up to 64).
SHAPE_CLASSES = {
    "RED DISC": ((220, 40, 40), "disc"),
    "GREEN SQUARE": ((40, 190, 60), "square"),
    "BLUE TRIANGLE": ((50, 70, 220), "triangle"),
    "YELLOW RING": ((230, 210, 40), "ring"),
    "CYAN CROSS": ((40, 200, 210), "cross"),
    "MAGENTA DISC": ((210, 50, 200), "disc"),
    "ORANGE SQUARE": ((240, 140, 30), "square"),
    "WHITE TRIANGLE": ((235, 235, 235), "triangle"),
    "BLACK RING": ((20, 20, 20), "ring"),
    "PURPLE CROSS": ((120, 40, 160), "cross"),
}
SHAPES_PER_SPLIT = {"train": 60, "valid": 12, "test": 12}  # images per class


def draw_shape(rng: np.random.Generator, colour: tuple, shape: str, size: int = 64) -> Image.Image:
    background = rng.integers(90, 170, 3)
    pixels = np.clip(background + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    else:
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=colour)
    return image


def make_shapes_archive(archive: Path, per_split: dict = SHAPES_PER_SPLIT) -> Path:
    """A zip in the headgear layout (``headgear.csv`` beside ``split/LABEL/NNN.jpg``) of the ten
    shape classes, the same bytes every time."""
    rng = np.random.default_rng(0)
    rows = ["class id,filepaths,labels,data set"]
    with zipfile.ZipFile(archive, "w") as zf:
        for split, count in per_split.items():
            for class_id, (label, (colour, shape)) in enumerate(SHAPE_CLASSES.items()):
                for i in range(count):
                    relative = f"{split}/{label}/{i + 1:03d}.jpg"
                    encoded = io.BytesIO()
                    draw_shape(rng, colour, shape).save(encoded, format="JPEG", quality=90)
                    zf.writestr(zipfile.ZipInfo(relative, (2026, 1, 1, 0, 0, 0)), encoded.getvalue())
                    rows.append(f"{class_id},{relative},{label},{split}")
        zf.writestr(zipfile.ZipInfo("headgear.csv", (2026, 1, 1, 0, 0, 0)), "\n".join(rows) + "\n")
    return archive
