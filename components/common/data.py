"""The headgear archive: safe extraction, validation, content-addressed versions, decoded images.

The archive's layout: ``train/<LABEL>/NNN.jpg``, ``valid/<LABEL>/N.jpg``,
``test/<LABEL>/N.jpg`` and a CSV (``headgear.csv``, sometimes ``headgear.csv.csv``) with
the columns ``class id, filepaths, labels, data set``. A prepared data version is a folder
holding the valid images under the same layout, ``index.csv`` (the columns above, good files
only) and ``manifest.json`` (version hash, classes, counts, skipped files).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.common.archive import safe_extract
from components.common.errors import DataError, first_line

SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ["class id", "filepaths", "labels", "data set"]
CSV_NAMES = ("headgear.csv", "headgear.csv.csv")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MANIFEST, INDEX = "manifest.json", "index.csv"


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


# --- reading the layout -----------------------------------------------------------------------


def find_root(folder: Path, shown_as: Path | None = None) -> Path:
    """The folder holding the split folders or the CSV (archives sometimes nest one level);
    errors name ``shown_as`` (the archive a scratch folder was extracted from)."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() or _find_csv(candidate):
            return candidate
    raise DataError(f"{shown_as or folder} has neither a train/ folder nor a CSV with columns {', '.join(CSV_COLUMNS)}")


def _find_csv(root: Path) -> Path | None:
    """The CSV that lists the images: ``headgear.csv`` (or ``headgear.csv.csv``), else the one
    CSV with the columns `CSV_COLUMNS`, in any order and beside others. Several such CSVs are
    refused (which one is meant cannot be known); so is a CSV with some of the columns but not
    all, where no CSV has them all. None: no CSV lists images, and the folders are read."""
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    complete, partial = [], []
    for path in sorted(root.glob("*.csv")):
        columns = set(_read_csv(path, nrows=0)[0].columns.str.strip())
        if set(CSV_COLUMNS) <= columns:
            complete.append(path)
        elif columns & set(CSV_COLUMNS):
            partial.append((path, [column for column in CSV_COLUMNS if column not in columns]))
    if len(complete) > 1:
        names = ", ".join(path.name for path in complete)
        raise DataError(
            f"{root} holds several CSVs that list images ({names}); keep one, or name the listing headgear.csv"
        )
    if complete:
        return complete[0]
    if partial:
        path, missing = partial[0]
        raise DataError(
            f"{path} lists images but lacks the columns {missing}; a listing needs {', '.join(CSV_COLUMNS)} "
            f"(in any order; other columns are ignored)"
        )
    return None


CSV_FALLBACK_ENCODING = "cp1252"  # what Windows' tools write when they do not write UTF-8


def _read_csv(path: Path, **options) -> tuple[pd.DataFrame, str]:
    """A CSV read as UTF-8 or, where that fails, as cp1252; and the encoding that was used."""
    for encoding in ("utf-8-sig", CSV_FALLBACK_ENCODING):
        try:
            return pd.read_csv(path, encoding=encoding, **options), encoding
        except UnicodeDecodeError:
            continue
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
            raise DataError(f"{path} cannot be read as a CSV ({first_line(error)}); fix it or remove it") from None
    raise DataError(f"{path} is neither UTF-8 nor {CSV_FALLBACK_ENCODING} text; save it as UTF-8")


@dataclass
class Listing:
    """What a data source lists: one row per image (CSV_COLUMNS), the files skipped before
    reading them (path and reason) and notes on what was changed."""

    frame: pd.DataFrame
    skipped: list[dict]
    notes: list[str]


def read_listing(root: Path) -> Listing:
    """The CSV if there is one, otherwise the folders: one row per listed image. Exact
    duplicate rows of the CSV are dropped; files whose names are not UTF-8 are skipped."""
    csv = _find_csv(root)
    if csv is not None:
        frame, encoding = _read_csv(csv)
        notes = [] if encoding == "utf-8-sig" else [f"{csv.name} is not UTF-8; read it as {encoding}"]
        frame.columns = frame.columns.str.strip()
        missing = [column for column in CSV_COLUMNS if column not in frame.columns]
        if missing:
            raise DataError(f"{csv} lacks the columns {missing}; expected {', '.join(CSV_COLUMNS)}")
        extra = [column for column in frame.columns if column not in CSV_COLUMNS]
        if extra:
            notes.append(f"{csv.name}: columns ignored: {_some([str(column) for column in extra])}")
        frame = frame[CSV_COLUMNS].copy()
        empty = frame.isna() | frame.astype(str).apply(lambda column: column.str.strip() == "")
        if empty.any(axis=None):
            row, column = next((r, c) for r, c in zip(*np.nonzero(empty.to_numpy())))
            raise DataError(
                f"{csv}: row {row + 2} (counting the header as row 1) has no {CSV_COLUMNS[column]!r}; "
                f"fill it in or delete the row"
            )
        frame["filepaths"] = frame["filepaths"].astype(str).str.replace("\\", "/", regex=False)
        frame["labels"] = frame["labels"].astype(str)
        frame["data set"] = frame["data set"].astype(str).str.strip().str.lower()
        unknown = sorted(set(frame["data set"]) - set(SPLITS))
        if unknown:
            raise DataError(f"{csv}: unknown values {unknown} in 'data set'; expected {', '.join(SPLITS)}")
        repeated = frame.duplicated()
        if repeated.any():
            notes.append(
                f"{csv.name} lists {int(repeated.sum())} rows twice, dropped: "
                f"{_some(frame.loc[repeated, 'filepaths'].tolist())}"
            )
            frame = frame[~repeated].reset_index(drop=True)
        return Listing(frame, [], notes)
    rows, skipped = [], []
    for split in SPLITS:
        for path in sorted((root / split).glob("*/*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                relative = path.relative_to(root).as_posix()
                try:
                    relative.encode("utf-8")
                except UnicodeEncodeError:  # undecodable bytes of the name, kept by Python as surrogates
                    shown = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                    skipped.append({"path": shown, "reason": "its name is not valid UTF-8; rename it"})
                    continue
                rows.append((relative, path.parent.name, split))
    frame = pd.DataFrame(rows, columns=["filepaths", "labels", "data set"])
    classes = sorted(frame["labels"].unique())
    frame.insert(0, "class id", frame["labels"].map({label: i for i, label in enumerate(classes)}))
    return Listing(frame, skipped, [])


def _some(items: list[str], shown: int = 5) -> str:
    """Up to ``shown`` items, then how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


# --- validation ------------------------------------------------------------------------------


def _check_file(root: Path, relative: str) -> tuple[str | None, str | None]:
    """Why the file cannot be used (None if it can) and the sha256 of its bytes."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        return "points outside the data folder", None
    if not path.is_file():
        return "listed but missing", None
    content = path.read_bytes()
    try:
        load_rgb(io.BytesIO(content))
    except Exception as error:  # PIL raises many kinds for corrupt files
        return f"does not decode ({type(error).__name__}: {error})", None
    return None, hashlib.sha256(content).hexdigest()


def validate(root: Path, listing: pd.DataFrame, strict: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Good rows, with the sha256 of each file's bytes as ``sha256``, and the bad files (path
    and reason). ``strict`` raises on the first bad file."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        checked = list(pool.map(lambda relative: _check_file(root, relative), listing["filepaths"]))
    problems = [problem for problem, _ in checked]
    bad = [{"path": path, "reason": reason} for path, reason in zip(listing["filepaths"], problems) if reason]
    if bad and strict:
        raise DataError(f"bad file {bad[0]['path']}: {bad[0]['reason']} (drop --strict to skip bad files)")
    good = listing.assign(sha256=[digest for _, digest in checked])[[problem is None for problem in problems]]
    good = good.reset_index(drop=True)
    _check_structure(good)
    return good, bad


def find_duplicates(frame: pd.DataFrame) -> list[list[str]]:
    """Files with the same bytes (``sha256``) listed under the same split and label, as groups
    of paths. The same bytes in two splits (the test set leaking into training) or under two
    labels (a contradiction) raise a DataError naming them."""
    groups = [group for _, group in frame.groupby("sha256", sort=False) if len(group) > 1]
    clashes = {"splits": [], "labels": []}
    kept = []
    for group in groups:
        first = group.iloc[0]
        for _, row in group.iloc[1:].iterrows():
            if row["data set"] != first["data set"]:
                clashes["splits"].append(f"{first['filepaths']} = {row['filepaths']}")
            elif row["labels"] != first["labels"]:
                clashes["labels"].append(f"{first['filepaths']} = {row['filepaths']}")
        if group["data set"].nunique() == 1 and group["labels"].nunique() == 1:
            kept.append(sorted(group["filepaths"]))
    if clashes["splits"]:
        raise DataError(
            f"the same image is in two splits, which would leak the evaluation images into training: "
            f"{_some(clashes['splits'])}; delete one file of each pair"
        )
    if clashes["labels"]:
        raise DataError(
            f"the same image has two labels: {_some(clashes['labels'])}; delete the file under the wrong label"
        )
    return sorted(kept)


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


def content_hash(frame: pd.DataFrame) -> str:
    """A hash over the listing (path, label, split) and the bytes of every file (``sha256``)."""
    digest = hashlib.sha256()
    for row in frame.sort_values("filepaths").itertuples(index=False):
        digest.update(f"{row[1]}\0{row[2]}\0{row[3]}\0{row[0]}\0".encode())
        digest.update(bytes.fromhex(row[4]))
    return digest.hexdigest()[:16]


def _manifest(version: str, source: str, frame: pd.DataFrame, bad: list[dict], duplicates, notes) -> dict:
    counts = frame.groupby(["data set", "labels"]).size()
    return {
        "version": version,
        "source": source,
        "classes": [label for _, label in sorted(set(zip(frame["class id"], frame["labels"])))],
        "counts": {split: int((frame["data set"] == split).sum()) for split in SPLITS},
        "per_class": {split: {label: int(n) for label, n in counts[split].items()} for split in SPLITS},
        "skipped": bad,
        "duplicates": duplicates,
        "notes": notes,
    }


def prepare(source: Path, store: Path, strict: bool = False) -> DataVersion:
    """Validates a zip or a folder in the archive layout and copies the good images into
    ``store/<version>/`` (reused when it already exists). What was changed on the way (rows
    listed twice, a CSV read as cp1252, the same image under two names) is printed and noted in
    the manifest's ``notes``, the same images under two names also in its ``duplicates``."""
    source = Path(source)
    if is_prepared(source):
        return load_version(source)
    with tempfile.TemporaryDirectory(prefix="headgear-") as scratch:
        extracted_notes = []
        if source.is_file() and zipfile.is_zipfile(source):
            extracted_notes = safe_extract(source, Path(scratch))
            root = find_root(Path(scratch), shown_as=source)
        elif source.is_dir():
            root = find_root(source)
        else:
            raise DataError(f"{source} is neither a zip archive nor a folder in the headgear layout")
        listing = read_listing(root)
        good, bad = validate(root, listing.frame, strict=strict)
        bad = listing.skipped + bad
        if bad and strict:
            raise DataError(f"bad file {bad[0]['path']}: {bad[0]['reason']} (drop --strict to skip bad files)")
        duplicates = find_duplicates(good)
        notes = extracted_notes + listing.notes
        if duplicates:
            shown = _some([" = ".join(group) for group in duplicates])
            notes.append(f"{len(duplicates)} sets of identical images under different names, kept: {shown}")
        for note in notes:
            print(f"note: {note}")
        version = content_hash(good)
        good = good[CSV_COLUMNS]
        target = Path(store) / version
        if not is_prepared(target):
            manifest = _manifest(version, str(source), good, bad, duplicates, notes)
            _store(root, good, manifest, target)
    return load_version(target)


def _store(root: Path, good: pd.DataFrame, manifest: dict, target: Path) -> None:
    """Copies a version into the store, in a folder of this process's own that is renamed to
    ``target`` once complete: a version folder is either complete or absent, also while several
    runs prepare the same data into one store (the first to finish provides it). The folders of
    processes that died on the way are removed."""
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    partial = target.parent / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for relative in good["filepaths"]:
        (partial / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, partial / relative)
    good.to_csv(partial / INDEX, index=False)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if target.exists() and not is_prepared(target):  # a folder of an older layout, or a foreign one
        shutil.rmtree(target, ignore_errors=True)
    try:
        partial.rename(target)
    except OSError:
        if not is_prepared(target):  # not another run's finished copy: a real failure
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


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
        from components.common.tracking import server_configured

        if not server_configured():
            raise DataError(
                f"data source {source!r} is not a file or folder here; pass a zip or a folder in the headgear "
                f"layout (or, with a ClearML server configured, a ClearML Dataset id)"
            )


def resolve(source: str, store: Path | None = None, strict: bool = False) -> DataVersion:
    """The data version of a zip, a folder (raw or prepared) or, with a ClearML server, a ClearML
    Dataset id. (The command lines `check_source` before any work; this reads the data.)"""
    path = Path(source).expanduser()
    if path.exists():
        return prepare(path, store or default_store(), strict=strict)
    from components.common.tracking import dataset_local_copy, server_configured

    if str(source) == KAGGLE or not server_configured():
        check_source(source)  # raises, saying why
    return prepare(dataset_local_copy(source), store or default_store(), strict)


def load_rgb(path: Path) -> Image.Image:
    """Decodes an image fully (truncated files fail here) and converts it to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")
