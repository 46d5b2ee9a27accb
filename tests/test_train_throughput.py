"""benchmarks/train_throughput.py: its CPU setting runs every row it promises (timings are
printed, never asserted), and its FLOP count agrees with an independent one;
benchmarks/count_syncs.py says plainly that it needs a GPU; benchmarks/profile_train.py and
benchmarks/step_breakdown.py run on a CPU too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from components.common.tracking import child_environment
from model import MODEL_PRESETS
from tests.archives import make_layout
from tests.repository import REPO


@pytest.mark.slow
def test_the_small_setting_prints_every_row(tmp_path):
    data = make_layout(tmp_path / "data", per_split=(16, 4, 4))
    command = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--small",
        "--data",
        str(data),
        "--output-json",
        str(tmp_path / "rows.json"),
    ]
    run = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["scope"], r["impl"], r["mode"]) for r in rows] == [
        ("augmentation", "augment", "eager"),
        ("model step", "timm", "eager"),
        ("model step", "sdpa", "eager"),
        ("model step", "separate", "eager"),
        ("training component", "sdpa", "eager"),
    ]
    assert all(r["images_per_second"] > 0 and r["mfu"] is None for r in rows)  # no GPU peak on a CPU
    assert "img/s" in run.stdout


@pytest.mark.parametrize(
    "preset, timm_name", [("vit-ti16", "vit_tiny_patch16_224"), ("vit-s16", "vit_small_patch16_224")]
)
def test_forward_flops_agree_with_torchs_flop_counter(preset, timm_name):
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import forward_flops

    model = timm.create_model(timm_name, pretrained=False, num_classes=1000).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matmuls, which the counter sees on a CPU
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert forward_flops({**MODEL_PRESETS[preset], "n_classes": 1000}, 224) == pytest.approx(
        counter.get_total_flops(), rel=0.01
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would train")
def test_count_syncs_says_it_needs_a_gpu():
    run = subprocess.run(
        [sys.executable, "benchmarks/count_syncs.py", "--data", "unused.zip"],
        cwd=REPO,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "needs a CUDA device" in run.stderr


@pytest.mark.slow
def test_profile_train_prints_the_busiest_operations(tmp_path):
    data = make_layout(tmp_path / "data", per_split=(16, 4, 4))
    command = [sys.executable, "benchmarks/profile_train.py", "--data", str(data), "--preset", "smoke", "--epochs", "2"]
    run = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Self CPU" in run.stdout and "images trained" in run.stdout


@pytest.mark.slow
def test_step_breakdown_prints_every_row(tmp_path):
    data = make_layout(tmp_path / "data", per_split=(16, 4, 4))
    command = [sys.executable, "benchmarks/step_breakdown.py", "--data", str(data), "--preset", "smoke"]
    command += ["--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "1", "--rand-augment", "2"]
    run = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.endswith("ms/step")]
    assert [row.split("  ")[0] for row in rows] == [
        "1. optimization step, fixed batch",
        "2. + augmentation (draws on the device)",
        "3. + drawing each epoch's draws",
        "augmentation alone",
        "drawing alone",
    ]
