"""The headgear archive: safe extraction, validation, content-addressed versions, decoded images.

The archive's layout: ``train/<LABEL>/NNN.jpg``, ``valid/<LABEL>/N.jpg``,
``test/<LABEL>/N.jpg`` and a CSV (``headgear.csv``, sometimes ``headgear.csv.csv``) with
the columns ``class id, filepaths, labels, data set``. A prepared data version is a folder
holding the valid images under the same layout, ``index.csv`` (the columns above, good files
only) and ``manifest.json`` (version hash, classes, counts, skipped files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ["class id", "filepaths", "labels", "data set"]
CSV_NAMES = ("headgear.csv", "headgear.csv.csv")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MANIFEST, INDEX = "manifest.json", "index.csv"


class DataError(ValueError):
    """The data cannot be used; the message names what is wrong and where."""


@dataclass
class DataVersion:
    """A validated, content-addressed copy of the data set."""

    root: Path
    index: pd.DataFrame  # CSV_COLUMNS, good files only, paths relative to root
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def split(self, name: str) -> pd.DataFrame:
        return self.index[self.index["data set"] == name].reset_index(drop=True)


# --- extraction -----------------------------------------------------------------------------


def safe_extract(archive: Path, target: Path) -> None:
    """Extracts a zip, refusing it whole if any entry would land outside ``target``
    (absolute paths, ``..``) or is a link."""
    with zipfile.ZipFile(archive) as zf:
        hostile = []
        for info in zf.infolist():
            path = PurePosixPath(info.filename.replace("\\", "/"))
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]) or is_link:
                hostile.append(info.filename)
        if hostile:
            raise DataError(
                f"refusing to extract {archive}: {len(hostile)} entries would land outside the target "
                f"or are links: {', '.join(hostile[:10])}"
            )
        zf.extractall(target)


# --- reading the layout -----------------------------------------------------------------------


def find_root(folder: Path) -> Path:
    """The folder holding the split folders or the CSV (archives sometimes nest one level)."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() or _find_csv(candidate):
            return candidate
    raise DataError(f"{folder} has neither a train/ folder nor a CSV with columns {', '.join(CSV_COLUMNS)}")


def _find_csv(root: Path) -> Path | None:
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    for path in sorted(root.glob("*.csv")):
        if list(pd.read_csv(path, nrows=0).columns.str.strip()) == CSV_COLUMNS:
            return path
    return None


def read_listing(root: Path) -> pd.DataFrame:
    """The CSV if there is one, otherwise the folders: one row per listed image."""
    csv = _find_csv(root)
    if csv is not None:
        frame = pd.read_csv(csv)
        frame.columns = frame.columns.str.strip()
        missing = [column for column in CSV_COLUMNS if column not in frame.columns]
        if missing:
            raise DataError(f"{csv} lacks the columns {missing}; expected {', '.join(CSV_COLUMNS)}")
        frame = frame[CSV_COLUMNS].copy()
        frame["filepaths"] = frame["filepaths"].str.replace("\\", "/", regex=False)
        frame["data set"] = frame["data set"].str.strip().str.lower()
        unknown = sorted(set(frame["data set"]) - set(SPLITS))
        if unknown:
            raise DataError(f"{csv}: unknown values {unknown} in 'data set'; expected {', '.join(SPLITS)}")
        return frame
    rows = []
    for split in SPLITS:
        for path in sorted((root / split).glob("*/*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((path.relative_to(root).as_posix(), path.parent.name, split))
    frame = pd.DataFrame(rows, columns=["filepaths", "labels", "data set"])
    classes = sorted(frame["labels"].unique())
    frame.insert(0, "class id", frame["labels"].map({label: i for i, label in enumerate(classes)}))
    return frame


# --- validation ------------------------------------------------------------------------------


def load_rgb(path: Path) -> Image.Image:
    """Decodes an image fully (truncated files fail here) and converts it to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _check_file(root: Path, relative: str) -> str | None:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        return "points outside the data folder"
    if not path.is_file():
        return "listed but missing"
    try:
        load_rgb(path)
    except Exception as error:  # PIL raises many kinds for corrupt files
        return f"does not decode ({type(error).__name__}: {error})"
    return None


def validate(root: Path, listing: pd.DataFrame, strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Good rows and the bad files (path and reason). ``strict`` raises on the first bad file."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        problems = list(pool.map(lambda relative: _check_file(root, relative), listing["filepaths"]))
    bad = [{"path": path, "reason": reason} for path, reason in zip(listing["filepaths"], problems) if reason]
    if bad and strict:
        raise DataError(f"bad file {bad[0]['path']}: {bad[0]['reason']} (drop --strict to skip bad files)")
    good = listing[[problem is None for problem in problems]].reset_index(drop=True)
    _check_structure(good)
    return good, bad


def _check_structure(frame: pd.DataFrame) -> None:
    for split in SPLITS:
        if not (frame["data set"] == split).any():
            raise DataError(f"the {split} split has no usable images")
    ids_per_label = frame.groupby("labels")["class id"].nunique()
    labels_per_id = frame.groupby("class id")["labels"].nunique()
    if (ids_per_label > 1).any() or (labels_per_id > 1).any():
        clashes = sorted(ids_per_label[ids_per_label > 1].index) + sorted(
            str(i) for i in labels_per_id[labels_per_id > 1].index
        )
        raise DataError(f"class ids and labels disagree for: {', '.join(map(str, clashes))}")
    ids = sorted(frame["class id"].unique())
    if ids != list(range(len(ids))):
        raise DataError(f"class ids must run from 0 to {len(ids) - 1} without gaps, got {ids}")
    classes = set(frame["labels"])
    for split in SPLITS:
        missing = sorted(classes - set(frame.loc[frame["data set"] == split, "labels"]))
        if missing:
            raise DataError(f"the {split} split has no images of the classes {missing}")


# --- versions ---------------------------------------------------------------------------------


def content_hash(root: Path, frame: pd.DataFrame) -> str:
    """A hash over the listing (path, label, split) and the bytes of every file."""
    digest = hashlib.sha256()
    for row in frame.sort_values("filepaths").itertuples(index=False):
        digest.update(f"{row[1]}\0{row[2]}\0{row[3]}\0{row[0]}\0".encode())
        digest.update(hashlib.sha256((root / row[1]).read_bytes()).digest())
    return digest.hexdigest()[:16]


def _manifest(version: str, source: str, frame: pd.DataFrame, bad: list[dict]) -> dict:
    counts = frame.groupby(["data set", "labels"]).size()
    return {
        "version": version,
        "source": source,
        "classes": [label for _, label in sorted(set(zip(frame["class id"], frame["labels"])))],
        "counts": {split: int((frame["data set"] == split).sum()) for split in SPLITS},
        "per_class": {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS},
        "skipped": bad,
    }


def prepare(source: Path, store: Path, strict: bool = False) -> DataVersion:
    """Validates a zip or a folder in the archive layout and copies the good images into
    ``store/<version>/`` (reused when it already exists)."""
    source = Path(source)
    if is_prepared(source):
        return load_version(source)
    with tempfile.TemporaryDirectory(prefix="headgear-") as scratch:
        if source.is_file() and zipfile.is_zipfile(source):
            safe_extract(source, Path(scratch))
            root = find_root(Path(scratch))
        elif source.is_dir():
            root = find_root(source)
        else:
            raise DataError(f"{source} is neither a zip archive nor a folder in the headgear layout")
        good, bad = validate(root, read_listing(root), strict=strict)
        version = content_hash(root, good)
        target = Path(store) / version
        if not is_prepared(target):
            partial = Path(store) / f".{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            for relative in good["filepaths"]:
                (partial / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / relative, partial / relative)
            good.to_csv(partial / INDEX, index=False)
            (partial / MANIFEST).write_text(json.dumps(_manifest(version, str(source), good, bad), indent=2))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)  # a version folder is either complete or absent
    return load_version(target)


def is_prepared(folder: Path) -> bool:
    return Path(folder).is_dir() and (Path(folder) / MANIFEST).is_file() and (Path(folder) / INDEX).is_file()


def load_version(folder: Path) -> DataVersion:
    folder = Path(folder)
    return DataVersion(folder, pd.read_csv(folder / INDEX), json.loads((folder / MANIFEST).read_text()))


def default_store() -> Path:
    return Path(os.environ.get("HEADGEAR_DATA_STORE", Path.home() / ".cache" / "headgear-vit" / "datasets"))


KAGGLE = "kaggle"


def check_source(source: str, allow_kaggle: bool = False) -> None:
    """Raises a DataError in a fraction of a second when ``source`` cannot be used: neither an
    existing zip archive, a folder in the headgear layout (raw or prepared), ``kaggle`` (where
    ``allow_kaggle``: fetch_data downloads it) nor, with a ClearML server, a Dataset id."""
    if str(source) == KAGGLE:
        if allow_kaggle:
            return
        raise DataError(
            "--data kaggle: this step takes data that is here already; fetch it first with "
            "`python -m components.fetch_data --source kaggle --output DIR` (or run the pipeline) and pass the "
            "data version folder it prints"
        )
    path = Path(source).expanduser()
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is a file but not a zip archive; pass the headgear .zip or a folder")
    elif path.is_dir():
        if not is_prepared(path):
            find_root(path)
    elif path.exists():
        raise DataError(f"{path} is neither a file nor a folder; pass a zip or a folder in the headgear layout")
    else:
        from components.tracking import server_configured

        if not server_configured():
            raise DataError(
                f"data source {source!r} is not a file or folder here; pass a zip or a folder in the headgear "
                f"layout (or, with a ClearML server configured, a ClearML Dataset id)"
            )


def resolve(source: str, store: Path | None = None, strict: bool = False) -> DataVersion:
    """A zip, a folder (raw or prepared) or, with a ClearML server, a ClearML Dataset id."""
    check_source(source)
    path = Path(source).expanduser()
    if path.exists():
        return prepare(path, store or default_store(), strict=strict)
    from clearml import Dataset

    return prepare(Path(Dataset.get(dataset_id=source).get_local_copy()), store or default_store(), strict)


# --- decoded images ---------------------------------------------------------------------------


def decode_split(data: DataVersion, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a split decoded once, resized to ``image_size`` square: uint8 (N, S, S, 3)
    and int64 labels (N,)."""
    frame = data.split(split)
    # OpenCV's bicubic when enlarging; pixel-area averaging when shrinking, which aliases less.
    resize = A.Resize(image_size, image_size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image")

    def decode(relative: str) -> np.ndarray:
        image = np.asarray(load_rgb(data.root / relative))
        return image if image.shape[:2] == (image_size, image_size) else resize(image=image)["image"]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = np.stack(list(pool.map(decode, frame["filepaths"])))
    return images, frame["class id"].to_numpy(dtype=np.int64, copy=True)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the paper's normalisation. Runs
    on whatever device the batch is on, so only uint8 bytes cross to the GPU."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def from_input(inputs: torch.Tensor) -> np.ndarray:
    """The inverse of `to_input`, for showing model inputs: float (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return inputs.add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
