"""highres: a smoke checkpoint moved to a larger grid, the paper's way."""

from __future__ import annotations

import json

from components import checkpoints
from components.highres import highres
from tests.conftest import FASHION_ZIP


def test_highres_switches_the_grid_evaluates_and_finetuning_lowers_the_loss(smoke_run, tmp_path):
    result = highres(
        smoke_run["checkpoint"],
        str(FASHION_ZIP),
        tmp_path / "highres.json",
        image_size=48,
        finetune_steps=30,
        device="cpu",
    )
    assert result["image_size"] == 48 and result["trained_image_size"] == 32
    assert "got 48x48" in result["no_resize_error"] and "set_image_size(48)" in result["no_resize_error"]
    for mode in ("bilinear", "bicubic", "bicubic_scaled", "finetuned"):
        assert 0.1 < result[f"test_accuracy_{mode}"] <= 1.0  # well above chance (0.1) after the resize
    assert result["test_loss_bicubic_scaled"] != result["test_loss_bicubic"]  # the scaling changed the model
    assert result["test_loss_finetuned"] < result["test_loss_bicubic"]
    assert len(result["finetune_losses"]) == 30
    assert json.loads((tmp_path / "highres.json").read_text())["checkpoint"] == result["checkpoint"]

    model, saved = checkpoints.load_model(result["checkpoint"])
    assert model.image_size == (48, 48) and model.projector.grid == (6, 6)


def test_highres_without_finetuning_reports_null(smoke_run, tmp_path):
    result = highres(
        smoke_run["checkpoint"], str(FASHION_ZIP), tmp_path / "h.json", image_size=64, finetune_steps=0, device="cpu"
    )
    assert result["test_accuracy_finetuned"] is None and result["finetune_losses"] == []
    assert checkpoints.load_model(result["checkpoint"])[0].projector.grid == (8, 8)
