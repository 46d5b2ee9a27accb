"""benchmarks/classic_baselines.py: every classic method gets a row on the split the training
component reads, learns the shape classes well above chance, and has its setting chosen on
the valid split (the best valid accuracy of its grid), never on test."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.archives import SHAPE_CLASSES, SHAPES_PER_SPLIT
from tests.repository import REPO


def load_script(monkeypatch):
    """The script as a module, without putting benchmarks/ on the import path."""
    spec = importlib.util.spec_from_file_location("classic_baselines", REPO / "benchmarks" / "classic_baselines.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 7.8-8.0 s on 2 idle cores (torch and scikit-learn imported, 300 trees twice), more when shared
def test_every_method_learns_the_shapes_with_its_setting_chosen_on_valid(shapes_zip, tmp_path, capsys, monkeypatch):
    script = load_script(monkeypatch)
    output = tmp_path / "classic.json"
    script.main(["--data", str(shapes_zip), "--image-size", "16", "--output-json", str(output)])
    result = json.loads(output.read_text())

    classes = len(SHAPE_CLASSES)
    assert result["images"] == {split: count * classes for split, count in SHAPES_PER_SPLIT.items()}
    assert [row["method"] for row in result["rows"]] == [method.name for method in script.METHODS]
    for row, method in zip(result["rows"], script.METHODS):
        assert row["test_accuracy"] >= 2 / classes, row  # chance is 1 / classes
        assert [entry["value"] for entry in row["grid"]] == list(method.grid)
        assert row["chosen"] in method.grid
        best = max(entry["valid_accuracy"] for entry in row["grid"])
        first_best = next(entry for entry in row["grid"] if entry["valid_accuracy"] == best)
        assert (row["chosen"], row["valid_accuracy"]) == (first_best["value"], best)
        assert row["train_seconds"] == first_best["train_seconds"] > 0

    printed = capsys.readouterr().out
    assert "| method | chosen on valid | valid accuracy | train s | test accuracy |" in printed
    assert all(f"| {method.name} |" in printed for method in script.METHODS)
