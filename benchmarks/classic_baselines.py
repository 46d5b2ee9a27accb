"""Classic classifiers beside the ViT, on the same train / valid / test split that
`components.train` reads: logistic regression, an RBF-kernel SVM and a random forest
(scikit-learn, a dev dependency), each on the pixels alone.

The features: each image decoded by the project's own `decode_split` at ``--image-size``
(28: the stand-in's Fashion-MNIST images were 28x28 before they were upsampled to 224),
made grayscale (the mean over RGB), scaled to [0, 1] and flattened; the logistic regression
and the SVM see them standardised (a `StandardScaler` fitted on the train split, in a
`Pipeline`). Each method's main hyper-parameter is chosen on the valid split from a small
grid (`METHODS`; a tie goes to the first, the simpler, value), every model of the grid fitted on
the train split alone, as the ViT is trained on it; the test split is used once, for the chosen
model. Train seconds are the wall time of that model's fit on the train split: the forest
grows its trees on all of this machine's cores, the other two run on one (BLAS is held to one
thread: matrices this small gain nothing from more, and where the cores are busy, threads
that wait for each other made the logistic regression's fit twenty times slower). The header
gives the load average at the start, which says whether the cores were shared.
Printed: a markdown table (method, setting chosen on valid, its valid accuracy, train seconds,
test accuracy with one standard error); ``--output-json`` also writes the rows, every grid
value's valid accuracy included.

    python benchmarks/classic_baselines.py --data fashion-mnist-headgear-layout.zip
    python benchmarks/classic_baselines.py --data fashion-mnist-headgear-layout.zip --output-json classic.json
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from components.common import cli
from components.common.atomic import write_json
from components.common.data import DataVersion, check_source, resolve
from components.common.devices import describe_device
from components.common.images import decode_split

REPO = Path(__file__).resolve().parents[1]
SEED = 0


@dataclass(frozen=True)
class Method:
    name: str
    parameter: str  # the hyper-parameter chosen on valid
    grid: tuple  # its values, simplest first
    build: Any  # value -> an unfitted scikit-learn estimator


def logistic_regression(c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=SEED))


def rbf_svm(c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", gamma="scale", random_state=SEED))


def random_forest(max_features: str | float) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=300, max_features=max_features, n_jobs=-1, random_state=SEED)


METHODS = (
    Method("logistic regression", "C", (0.01, 0.1, 1.0), logistic_regression),
    Method("RBF SVM (gamma=scale)", "C", (1.0, 10.0), rbf_svm),
    Method("random forest (300 trees)", "max_features", ("sqrt", 0.1), random_forest),
)


def features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, S*S): grayscale (the mean over RGB) in [0, 1], flattened."""
    return (images.mean(axis=-1, dtype=np.float32) / 255.0).reshape(len(images), -1)


def load_splits(data: DataVersion, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split in ("train", "valid", "test"):
        images, labels = decode_split(data, split, image_size)
        splits[split] = features(images), labels
    return splits


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


def run_method(method: Method, splits: dict) -> dict:
    """Every grid value fitted on train and scored on valid; the best on valid scored on test."""
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits["train"], splits["valid"], splits["test"]
    grid, best = [], None
    for value in method.grid:
        model = method.build(value)
        started = time.perf_counter()
        model.fit(x_train, y_train)
        seconds = time.perf_counter() - started
        valid_accuracy = accuracy(model, x_valid, y_valid)
        grid.append({"value": value, "valid_accuracy": valid_accuracy, "train_seconds": seconds})
        if best is None or valid_accuracy > best[0]["valid_accuracy"]:  # ties: the earlier, simpler value
            best = grid[-1], model
    chosen, model = best
    test_accuracy = accuracy(model, x_test, y_test)
    return {
        "method": method.name,
        "parameter": method.parameter,
        "chosen": chosen["value"],
        "valid_accuracy": chosen["valid_accuracy"],
        "train_seconds": chosen["train_seconds"],
        "test_accuracy": test_accuracy,
        "test_standard_error": math.sqrt(test_accuracy * (1 - test_accuracy) / len(y_test)),
        "grid": grid,
    }


def commit() -> str:
    try:
        run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def classic_baselines(source: str, image_size: int, output_json: Path | None = None) -> dict:
    """Runs every method of `METHODS`, prints the header and the table, returns (and writes to
    ``output_json``) the header's facts and the rows."""
    started = time.perf_counter()
    data = resolve(source)
    splits = load_splits(data, image_size)
    counts = {split: len(labels) for split, (_, labels) in splits.items()}
    result = {
        "data": source,
        "data_version": data.version,
        "classes": len(data.classes),
        "images": counts,
        "image_size": image_size,
        "device": describe_device(torch.device("cpu")),
        "scikit_learn": sklearn.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "load_average": os.getloadavg()[0],
    }
    print(
        f"classic baselines on {Path(source).name} (version {data.version[:12]}, {result['classes']} classes, "
        f"{counts['train']} / {counts['valid']} / {counts['test']} images), {image_size}x{image_size} grayscale; "
        f"{result['device']}, load average {result['load_average']:.1f} at the start, "
        f"scikit-learn {result['scikit_learn']}, {result['date']}, commit {result['commit']}"
    )
    with threadpool_limits(limits=1, user_api="blas"):
        result["rows"] = [run_method(method, splits) for method in METHODS]
    result["total_seconds"] = time.perf_counter() - started
    print("| method | chosen on valid | valid accuracy | train s | test accuracy |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in result["rows"]:
        print(
            f"| {row['method']} | {row['parameter']}={row['chosen']} | {row['valid_accuracy']:.1%} "
            f"| {row['train_seconds']:.1f} | {row['test_accuracy']:.1%} (±{row['test_standard_error']:.1%}) |"
        )
    print(f"chance: {1 / result['classes']:.1%}; the whole run took {result['total_seconds']:.0f} s")
    if output_json:
        write_json(result, output_json)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = cli.Parser("classic_baselines", __doc__)
    parser.add_argument("--data", required=True, help="a zip or folder in the headgear layout")
    parser.add_argument(
        "--image-size", type=cli.positive_int, default=28, help="pixels a side the images are decoded at (28)"
    )
    parser.add_argument("--output-json", type=cli.output_file, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    cli.run(parser, check_source, args.data)
    return cli.run(parser, classic_baselines, args.data, args.image_size, args.output_json)


if __name__ == "__main__":
    main()
