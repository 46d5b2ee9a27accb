"""pipelines/summary.py's report on a hand-made summary: the header says what ran, with each
step's wall time when the runner gives it, and the page stands alone at any width."""

from __future__ import annotations

import re
from dataclasses import asdict

import pandas as pd

from components.common.plots import curves_figure
from components.common.presets import preset
from pipelines.summary import write_report


def made_up_run(tmp_path) -> tuple[dict, dict]:
    figure = curves_figure({"loss": {"train": [2.0, 1.0]}}, "epoch", "a title")
    figure.savefig(tmp_path / "curves.png")
    summary = {
        "dataset": {"source": "shapes.zip", "version": "abc123", "classes": ["A", "B"], "counts": {"train": 4}},
        "train": {"preset": "smoke"},
        "clearml": {"train": str(tmp_path / "train.clearml-offline.zip")},
    }
    steps = {
        "train": {
            "config": asdict(preset("smoke", seed=3)),
            "device": "cpu (2 cores)",
            "versions": {"torch": "9.9", "clearml": "8.8"},
            "plots": [{"path": str(tmp_path / "curves.png"), "caption": "Loss <falls>."}],
        }
    }
    return summary, steps


def test_the_header_says_what_ran_and_each_steps_time_when_given(tmp_path):
    summary, steps = made_up_run(tmp_path)
    table = pd.DataFrame([("test accuracy @ 32", "50.00%", "share correct")], columns=["result", "value", "meaning"])
    page = write_report(summary, table, steps, tmp_path / "a.html", {"train": 12.4, "evaluate": 3.0}).read_text()
    assert "shapes.zip, version abc123: 2 classes, 4 train" in page and "<dt>seed</dt><dd>3</dd>" in page
    assert "vit-tiny-test" in page and "cpu (2 cores)" in page and "torch 9.9, clearml 8.8" in page
    assert "<dt>wall time</dt><dd>train 12 s, evaluate 3 s</dd>" in page
    assert "<figcaption>Loss &lt;falls&gt;.</figcaption>" in page and page.count("data:image/png;base64,") == 1
    assert "--import-offline-session" in page and "white-space:pre-wrap" in page  # long paths wrap at 800 px

    without = write_report(summary, table, steps, tmp_path / "b.html").read_text()
    assert "wall time" not in without
    assert re.findall(r"""(?:src|href)\s*=\s*["']([^"':]*)""", without) == ["data"]  # the one image, inline
