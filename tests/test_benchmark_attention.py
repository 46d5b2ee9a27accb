"""benchmark_attention: the implementations must agree before they are timed, and --quick
produces every row of its sweep."""

from __future__ import annotations

import json

import pytest
import torch

from components.benchmark_attention import IMAGE_SIZES, benchmark_attention, build_modules, check_agreement

KEYS = {
    "impl",
    "scope",
    "device",
    "dtype",
    "batch_size",
    "image_size",
    "tokens",
    "fwd_ms",
    "fwd_bwd_ms",
    "speedup_vs_separate",
}


def test_quick_cpu_run_produces_every_row_of_its_sweep(tmp_path):
    result = benchmark_attention(tmp_path / "benchmark.json", device="cpu", quick=True)
    rows = result["rows"]
    impls = ["separate", "fused", "sdpa", "timm"]
    expected = {(impl, scope, size) for impl in impls for scope in ("attention", "model") for size in IMAGE_SIZES}
    assert {(row["impl"], row["scope"], row["image_size"]) for row in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert KEYS <= set(row) and row["device"] == "cpu" and row["dtype"] == "float32"
        assert row["tokens"] == 1 + (row["image_size"] // 16) ** 2
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0  # timings are printed, never compared
        if row["impl"] == "separate":
            assert row["speedup_vs_separate"] == 1.0
    written = json.loads((tmp_path / "benchmark.json").read_text())
    assert written["rows"] == rows
    assert (tmp_path / "benchmark.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "benchmark.clearml-offline.zip").is_file()


@pytest.mark.parametrize("scope", ["attention", "model"])
def test_implementations_that_disagree_are_not_timed(scope):
    modules = build_modules(scope, "vit-tiny-test", 224, torch.device("cpu"))
    inputs = torch.randn(2, 197, 32) if scope == "attention" else torch.randn(2, 3, 224, 224)
    check_agreement(modules, inputs, torch.float32)  # the same weights: they agree
    with torch.no_grad():
        qkv = next(p for name, p in modules["sdpa"].named_parameters() if "qkv.weight" in name)
        qkv.add_(torch.randn_like(qkv))  # (a constant would vanish after the LayerNorm)
    with pytest.raises(AssertionError, match="sdpa differs from separate"):
        check_agreement(modules, inputs, torch.float32)
