"""highres: a smoke checkpoint moved to a larger grid, the paper's way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.common import checkpoints
from components.common.augment import augment
from components.common.data import resolve
from components.common.images import decode_split
from components.common.metrics import logit_metrics, mcnemar_p, split_metrics
from components.common.presets import FinetuneConfig
from components.common.resize import calibrate_attention, interpolate_finetune
from components.highres import VARIANTS, highres
from pipelines.summary import highres_part


def run_highres(smoke_run, shapes_zip, tmp_path, image_size: int = 48, **finetune) -> dict:
    """highres on the smoke checkpoint (trained at 32), on the CPU, to 48 unless told, with a
    fine-tune of these settings."""
    tuning = FinetuneConfig(**finetune)
    return highres(smoke_run["checkpoint"], str(shapes_zip), tmp_path / "highres.json", image_size, tuning, "cpu")


@pytest.fixture(scope="module")
def finetuned(smoke_run, shapes_zip, tmp_path_factory) -> dict:
    """highres from 32 to 48 with a fine-tune of 30 steps, run once; its result and the folder
    it wrote to."""
    folder = tmp_path_factory.mktemp("highres")
    return {"result": run_highres(smoke_run, shapes_zip, folder, steps=30), "folder": folder}


def test_highres_moves_the_model_to_the_larger_grid(finetuned):
    result = finetuned["result"]
    assert result["image_size"] == 48 and result["trained_image_size"] == 32
    model, _ = checkpoints.load_model(result["checkpoint"])
    assert model.image_size == (48, 48) and model.projector.grid == (6, 6)


def test_the_model_not_resized_refuses_the_larger_images_saying_how_to_resize(finetuned):
    error = finetuned["result"]["no_resize_error"]
    assert "got 48x48" in error and "set_image_size(48)" in error


def test_every_variant_is_well_above_chance_after_the_resize(finetuned):
    for mode in VARIANTS:
        assert 0.1 < finetuned["result"][f"test_accuracy_{mode}"] <= 1.0, mode  # chance is 0.1


def test_the_attention_calibration_tries_eleven_factors_from_1_to_2_each_changing_the_model(finetuned):
    curve = finetuned["result"]["attention_calibration"]  # the paper's attention first
    assert curve[0]["factor"] == 1.0 and curve[-1]["factor"] == pytest.approx(2.0) and len(curve) == 11
    assert len({row["loss"] for row in curve}) == len(curve)


def test_the_attention_scale_is_the_factor_with_the_lowest_validation_loss(finetuned):
    result = finetuned["result"]
    best = min(result["attention_calibration"], key=lambda row: row["loss"])
    assert result["attention_scale"] == best["factor"]
    if best["factor"] == 1.0:
        assert result["test_loss_bicubic_calibrated"] == pytest.approx(result["test_loss_bicubic"])
    else:
        assert result["test_loss_bicubic_calibrated"] != result["test_loss_bicubic"]


def test_finetuning_lowers_the_test_loss(finetuned):
    result = finetuned["result"]
    assert len(result["finetune_losses"]) == 30
    assert result["test_loss_finetuned"] < result["test_loss_bicubic"]


def test_the_share_of_the_finetune_kept_has_the_lowest_validation_loss(finetuned):
    # from the bicubic start (the attention curve's first point, the same model on the same
    # split) to the fine-tuned end, the lowest loss chosen
    result = finetuned["result"]
    shares = result["finetune_interpolation"]
    assert [row["factor"] for row in shares] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert shares[0]["loss"] == pytest.approx(result["attention_calibration"][0]["loss"], rel=1e-5)
    assert result["finetune_kept"] == min(shares, key=lambda row: row["loss"])["factor"]
    if result["finetune_kept"] == 1.0:
        assert result["test_loss_finetuned_interpolated"] == pytest.approx(result["test_loss_finetuned"])


def test_the_saved_model_is_the_finetune_with_the_share_kept(finetuned, shapes_zip):
    model, _ = checkpoints.load_model(finetuned["result"]["checkpoint"])
    test_images, test_labels = decode_split(resolve(str(shapes_zip)), "test", 48)
    saved_loss = split_metrics(model, test_images, test_labels, torch.device("cpu"))["loss"]
    assert saved_loss == pytest.approx(finetuned["result"]["test_loss_finetuned_interpolated"], rel=1e-5)


def test_every_plot_is_drawn_and_said_in_words(finetuned):
    plots = finetuned["result"]["plots"]
    for plot in plots:
        assert Path(plot["path"]).is_file() and len(plot["caption"]) > 80
    assert {Path(plot["path"]).name for plot in plots} == {
        f"highres.{name}png" for name in ("", "attention.", "attention_maps.", "interpolation.", "pos_embed.")
    }


def test_highres_writes_its_result_to_the_json_it_is_given(finetuned):
    written = json.loads((finetuned["folder"] / "highres.json").read_text())
    assert written["checkpoint"] == finetuned["result"]["checkpoint"]


def test_the_images_gained_and_lost_against_the_trained_size_add_up_to_the_accuracy_difference(finetuned, shapes_zip):
    result = finetuned["result"]
    n_test = len(decode_split(resolve(str(shapes_zip)), "test", 32)[1])
    assert set(result["test_changes"]) == set(VARIANTS)
    for mode, change in result["test_changes"].items():
        difference = (result[f"test_accuracy_{mode}"] - result["reference_accuracy"]) * n_test
        assert change["gained"] - change["lost"] == round(difference), mode
        assert change["mcnemar_p"] == mcnemar_p(change["gained"], change["lost"]), mode


def test_highres_without_finetuning_reports_null(smoke_run, shapes_zip, tmp_path):
    result = run_highres(smoke_run, shapes_zip, tmp_path, image_size=64, steps=0)
    assert result["test_accuracy_finetuned"] is None and result["finetune_losses"] == []
    assert result["test_accuracy_finetuned_interpolated"] is None and result["finetune_kept"] is None
    assert result["finetune_interpolation"] == [] and len(result["plots"]) == 4
    assert len(result["attention_calibration"]) == 11 and 1.0 <= result["attention_scale"] <= 2.0
    assert checkpoints.load_model(result["checkpoint"])[0].projector.grid == (8, 8)


def test_calibrate_attention_picks_the_lowest_validation_loss_and_flattens_when_the_grid_shrinks(smoke_run, shapes_zip):
    model, _ = checkpoints.load_model(smoke_run["checkpoint"])
    trained_tokens = 1 + model.projector.grid[0] * model.projector.grid[1]
    images, labels = decode_split(resolve(str(shapes_zip)), "valid", 24)
    model.set_image_size(24)  # 3x3 patches instead of 4x4: fewer tokens, factors from 1 down to 1/2
    curve = calibrate_attention(model, images, labels, torch.device("cpu"), trained_tokens, steps=4)
    assert curve["factor"].tolist() == pytest.approx([1.0, 2**-0.25, 2**-0.5, 2**-0.75, 0.5])
    chosen = curve["factor"][curve["loss"].idxmin()]
    assert model.config["attention_scale"] == chosen
    assert all(block.attn.scale == pytest.approx(chosen * block.attn.qkv_dim**-0.5) for block in model.blocks)
    assert split_metrics(model, images, labels, torch.device("cpu"))["loss"] == pytest.approx(curve["loss"].min())


def test_interpolate_finetune_keeps_the_share_of_the_change_with_the_lowest_validation_loss(smoke_run, shapes_zip):
    model, _ = checkpoints.load_model(smoke_run["checkpoint"])
    images, labels = decode_split(resolve(str(shapes_zip)), "valid", 32)
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():  # a stand-in for a fine-tune that went too far: every weight moved
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * weight.std().nan_to_num(0.02))
    after = {name: weight.clone() for name, weight in model.state_dict().items()}
    end_loss = split_metrics(model, images, labels, torch.device("cpu"))["loss"]

    curve = interpolate_finetune(model, before, images, labels, torch.device("cpu"), steps=4)
    assert curve["factor"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    start, _ = checkpoints.load_model(smoke_run["checkpoint"])
    assert curve["loss"].iloc[0] == pytest.approx(split_metrics(start, images, labels, torch.device("cpu"))["loss"])
    assert curve["loss"].iloc[-1] == pytest.approx(end_loss)
    kept = curve["factor"][curve["loss"].idxmin()]
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, before[name] + kept * (after[name] - before[name]))
    assert split_metrics(model, images, labels, torch.device("cpu"))["loss"] == pytest.approx(curve["loss"].min())


def test_a_model_with_the_convolutional_tokenizer_trains_and_moves_to_twice_its_size(shapes_zip, tmp_path):
    # cpu-10min's kind of model, end to end: trained at 16 from tokens of its convolutions, then
    # at 32 with the position embeddings interpolated and fine-tuned.
    from components.train import train

    trained = train(str(shapes_zip), "smoke", tmp_path / "train", stem="conv", patch_size=4, image_size=16, epochs=4)
    assert checkpoints.read_weights(Path(trained["checkpoint"]))["config"]["stem"] == "conv"
    result = highres(
        trained["checkpoint"], str(shapes_zip), tmp_path / "highres.json", 32, FinetuneConfig(steps=10), "cpu"
    )
    assert result["image_size"] == 32 and result["trained_image_size"] == 16
    moved = checkpoints.read_weights(Path(result["checkpoint"]))
    assert moved["config"]["stem"] == "conv" and moved["config"]["image_size"] == [32, 32]


def test_mcnemar_p_is_the_two_sided_binomial_tail_of_the_changed_images():
    assert mcnemar_p(0, 0) == 1.0  # nothing changed: no evidence either way
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10) == 2 / 2**10  # all ten changes one way
    assert mcnemar_p(4, 1) == pytest.approx(2 * (1 + 5) / 2**5)  # C(5,0) + C(5,1), both tails
    assert mcnemar_p(21, 19) == pytest.approx(0.875, abs=0.001)  # 40 changes split near evenly: chance
    assert mcnemar_p(5, 5) == 1.0  # capped at 1: the two tails overlap at the middle


def test_gained_and_lost_break_ties_as_the_accuracy_does():
    # bf16 logits tie now and then; the counts must add up to the accuracy they explain
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 3.0]])
    metrics = logit_metrics(logits, np.array([1, 1, 2]), reference=np.zeros(3, dtype=bool))
    assert metrics["gained"] == round(metrics["accuracy"] * 3) and metrics["lost"] == 0


@pytest.mark.parametrize("crop", [{}, {"crop_scale": 0.35}], ids=["default", "cropped"])
def test_the_finetune_sees_whole_images_and_flips_unless_asked_to_crop(
    smoke_run, shapes_zip, tmp_path, monkeypatch, crop
):
    # The real augmentation, watched: the maps (output -> input coordinates) it is given.
    geometries = []

    def watched_augment(images, draws, *args, **kwargs):
        geometries.append(draws.geometry.cpu())
        return augment(images, draws, *args, **kwargs)

    monkeypatch.setattr("components.common.resize.augment", watched_augment)
    run_highres(smoke_run, shapes_zip, tmp_path, steps=4, **crop)
    theta = torch.cat(geometries)
    assert len(theta) == 4 * 64
    if not crop:  # the whole image, mirrored or not: the test images' view at the new size
        assert set(theta[:, 0, 0].tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(theta[:, :, 1:], torch.tensor([[0.0, 0.0], [1.0, 0.0]]).expand(len(theta), 2, 2))
    else:
        assert (theta[:, 0, 0].abs() < 0.95).float().mean() > 0.5  # most views are crops, as in training


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_a_finetune_crop_scale_outside_0_1_is_refused(scale):
    with pytest.raises(ValueError, match=rf"--finetune-crop-scale must be in \(0, 1\].*got {scale}"):
        FinetuneConfig(crop_scale=scale)


def test_the_summary_keeps_each_variants_accuracy_and_the_numbers_chosen(smoke_run, shapes_zip, tmp_path):
    result = run_highres(smoke_run, shapes_zip, tmp_path, steps=0)
    part = highres_part(result)
    assert part == {
        "image_size": 48,
        **{f"test_accuracy_{name}": result[f"test_accuracy_{name}"] for name in VARIANTS},
        "attention_scale": result["attention_scale"],
        "finetune_kept": None,
    }
    labels = [row["label"] for row in result["variants"]]
    assert len(set(labels)) == len(VARIANTS) and "skipped" in labels[-2] and "skipped" in labels[-1]
    assert f"x{result['attention_scale']:.2f}" in labels[2]
