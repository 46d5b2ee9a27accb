"""fetch_data: the headgear images from Kaggle (or a local zip or folder), validated, versioned
by content, reported to ClearML and, with a server, registered as a ClearML Dataset.

    python -m components.fetch_data --source kaggle --output runs/data
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from components.common import cli
from components.common.atomic import write_json
from components.common.data import KAGGLE, check_source, resolve
from components.common.errors import DataError
from components.common.plots import class_counts_figure
from components.common.tracking import open_task, register_dataset

KAGGLE_DATASET = "gpiosenka/headgear-image-classification"


def kaggle_credentials_present() -> bool:
    """Any of the ways the kaggle package finds credentials, checked without importing it
    (its import prints a long help text when there are none)."""
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    folders = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    folders += [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any((folder / name).is_file() for folder in folders for name in ("kaggle.json", "access_token"))


def check_kaggle_credentials(flag: str = "--source") -> None:
    """Raises a DataError, saying where credentials go, when this machine has none for Kaggle;
    ``flag`` is where a local archive would go instead."""
    if not kaggle_credentials_present():
        raise DataError(
            "no Kaggle credentials found: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put "
            "kaggle.json in ~/.kaggle/ (https://www.kaggle.com/settings/api), or pass a local archive "
            f"({flag} PATH.zip)"
        )


def download_from_kaggle(target: Path) -> Path:
    """The archive of the Kaggle data set, downloaded into ``target``."""
    check_kaggle_credentials()
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit:
        raise DataError("Kaggle rejected the credentials found; check KAGGLE_USERNAME/KAGGLE_KEY") from None
    try:
        api.dataset_download_files(KAGGLE_DATASET, path=str(target), unzip=False, quiet=False)
    except Exception as error:  # requests' ConnectionError, HTTP errors, ...
        raise DataError(
            f"could not download {KAGGLE_DATASET} from Kaggle ({type(error).__name__}); check the network, "
            f"or download the archive yourself and pass --source PATH.zip"
        ) from None
    archives = sorted(target.glob("*.zip"))
    if not archives:
        raise DataError(f"Kaggle's download left no zip archive in {target}")
    return archives[0]


def fetch_data(source: str, output: Path, strict: bool = False) -> dict:
    """Fetches, validates and versions the data. Returns ``{"source", "version", "path", "data"
    (what the next steps read: with a server the ClearML Dataset's id, else ``path``),
    "classes", "counts", "skipped", "clearml"}``."""
    output = Path(output)
    with open_task("fetch_data", "data_processing", output) as tracker:
        params = tracker.connect({"source": source, "strict": strict})
        with tempfile.TemporaryDirectory(prefix="kaggle-") as download:
            local = str(download_from_kaggle(Path(download))) if params["source"] == KAGGLE else params["source"]
            data = resolve(local, output, strict=params["strict"])
        manifest = data.manifest
        for bad in manifest["skipped"]:
            print(f"skipped {bad['path']}: {bad['reason']}")
        import pandas as pd

        tracker.table("class counts", pd.DataFrame(manifest["per_class"]).rename_axis("class").reset_index())
        tracker.figure("class counts", class_counts_figure(manifest["per_class"]))
        tracker.artifact("manifest", manifest)
        from_dataset = params["source"] if params["source"] != KAGGLE and not Path(local).exists() else None
        result = {
            "source": source,
            "version": data.version,
            "path": str(data.root),
            "data": str(data.root) if tracker.offline else register_dataset(data, parent=from_dataset),
            "classes": data.classes,
            "counts": manifest["counts"],
            "skipped": manifest["skipped"],
        }
    result["clearml"] = tracker.session
    write_json(result, output / "fetch_data.json")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("fetch_data", __doc__)
    parser.add_argument(
        "--source",
        default=KAGGLE,
        help="'kaggle' (needs Kaggle credentials), a local .zip or folder in the headgear layout, or (with a "
        "ClearML server) a ClearML Dataset id (default: kaggle)",
    )
    parser.add_argument(
        "--output", type=cli.output_folder, required=True, help="folder for the data version and fetch_data.json"
    )
    parser.add_argument("--strict", action="store_true", help="fail on the first bad image instead of skipping it")
    args = parser.parse_args(argv)
    cli.run(parser, check_source, args.source, allow_kaggle=True)
    result = cli.run(parser, fetch_data, args.source, args.output, strict=args.strict)
    print(f"data version {result['version']} at {result['path']}: {result['counts']}")


if __name__ == "__main__":
    main()
