"""Shared fixtures: archives in the headgear layout made with real JPEGs, and a ClearML that
never talks to a server (offline sessions under a temporary folder)."""

from __future__ import annotations

import os
import socket
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_SCRATCH = Path(tempfile.mkdtemp(prefix="headgear-tests-"))
# Before anything imports clearml: tests never reach a server, even where one is configured.
os.environ["CLEARML_OFFLINE_MODE"] = "1"
os.environ["CLEARML_CONFIG_FILE"] = str(REPO / "components" / "clearml-offline.conf")
os.environ["CLEARML_CACHE_DIR"] = str(_SCRATCH / "clearml-cache")
os.environ["HEADGEAR_DATA_STORE"] = str(_SCRATCH / "store")
for secret in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "CLEARML_API_HOST"):
    os.environ.pop(secret, None)
os.environ["KAGGLE_CONFIG_DIR"] = str(_SCRATCH / "no-kaggle-config")

FASHION_ZIP = REPO.parent / "shared" / "data" / "fashion-mnist-headgear-layout.zip"
CLASSES = ["BASEBALL CAP", "BERET", "ZUCCHETTO"]


def closed_port() -> int:
    """A local port nothing listens on: where a ClearML server is configured but absent."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "headgear")


@pytest.fixture
def fashion_zip() -> Path:
    if not FASHION_ZIP.is_file():
        pytest.skip(f"{FASHION_ZIP} is not here (it lies in shared/ beside the repository)")
    return FASHION_ZIP


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
    """The smoke preset trained once on the Fashion-MNIST stand-in, shared by the tests that
    need a trained checkpoint."""
    if not FASHION_ZIP.is_file():
        pytest.skip(f"{FASHION_ZIP} is not here (it lies in shared/ beside the repository)")
    from components.train import train

    return train(str(FASHION_ZIP), "smoke", tmp_path_factory.mktemp("smoke"))
