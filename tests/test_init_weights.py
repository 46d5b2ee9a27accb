"""--init: a model started from a timm ViT's weights computes what the timm model computes up
to its new head, at another size with timm's own resampling of the position embeddings, and
an architecture that does not fit is refused with the setting to change before any work.

No weights are downloaded here: timm models are built with random weights and saved locally;
where a test goes through ``timm:<name>``, ``timm.create_model``'s download (which needs the
internet) is replaced by the same model built without pretrained weights."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from components.common import checkpoints
from components.common.init_weights import initial_weights
from components.common.presets import PRESETS, architecture, preset
from components.common.training import build_model
from components.train import main, train
from model import ViT, model_config
from tests.archives import make_layout

TINY_TEST = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # vit-tiny-test


def random_timm(img_size=32, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=img_size, num_classes=7, **{**TINY_TEST, **kwargs})
    with torch.no_grad():  # timm zero-initialises some tensors; make every one matter
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def saved(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def initialised(source: str, image_size=32, n_classes=3) -> ViT:
    model = ViT(**model_config("vit-tiny-test", image_size=image_size, n_classes=n_classes))
    model.load_state_dict({**model.state_dict(), **initial_weights(source, model.config).state})
    return model.eval()


def features(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """What our head sees: the normalised class token."""
    return model.norm(model.blocks(model.projector(images))[:, 0])


@torch.no_grad()
def test_the_model_after_init_computes_the_timm_models_features_with_a_fresh_head(tmp_path):
    reference = random_timm()
    model = initialised(saved(reference, tmp_path / "timm.pt"))
    images = torch.randn(4, 3, 32, 32)
    expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(features(model, images), expected, rtol=1e-5, atol=1e-5)
    assert model.head.weight.shape == (3, 32) and not model.head.weight.any()  # the init's zero head


@torch.no_grad()
def test_a_wrapped_state_dict_and_a_checkpoint_of_this_project_start_the_same_model(tmp_path):
    reference = random_timm()
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "wrapped.pt")
    from_timm = initialised(str(tmp_path / "wrapped.pt"))
    checkpoint = tmp_path / "ours.pt"
    checkpoints.save_atomic({"model": from_timm.state_dict(), "config": from_timm.config}, checkpoint)
    from_ours = initialised(str(checkpoint), n_classes=5)
    images = torch.randn(2, 3, 32, 32)
    expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(features(from_timm, images), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features(from_ours, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timm_size, our_size", [(48, 32), (32, 64)])
def test_the_position_embeddings_are_resampled_as_timm_does(tmp_path, timm_size, our_size):
    reference = random_timm(img_size=timm_size)
    model = initialised(saved(reference, tmp_path / "timm.pt"), image_size=our_size)
    grid = our_size // 8
    expected = resample_abs_pos_embed(reference.pos_embed, new_size=(grid, grid), num_prefix_tokens=1)
    torch.testing.assert_close(model.projector.pos_embed.data, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "timm_kwargs, fix",
    [
        (dict(patch_size=4), "train with --patch-size 4"),
        (dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0), "train with --model vit-ti16"),
        (dict(depth=3), "a --model of that architecture"),
    ],
)
def test_another_architecture_is_refused_with_the_setting_to_change(tmp_path, timm_kwargs, fix):
    source = saved(
        random_timm(img_size=224 if timm_kwargs.get("patch_size") == 16 else 32, **timm_kwargs), tmp_path / "t.pt"
    )
    with pytest.raises(ValueError, match=fix):
        initial_weights(source, model_config("vit-tiny-test", image_size=32))


def test_weights_of_the_other_stem_are_refused_with_the_stem_to_train(tmp_path):
    paper = saved(random_timm(), tmp_path / "timm.pt")  # timm's ViTs project patches linearly
    with pytest.raises(ValueError, match=r"stem linear \(this model: conv\): train with --stem linear$"):
        initial_weights(paper, model_config("vit-tiny-test", image_size=32, stem="conv"))


def test_the_architecture_is_checked_before_the_data_is_touched(tmp_path):
    source = saved(random_timm(patch_size=4), tmp_path / "timm.pt")
    unreadable = make_layout(tmp_path / "data")  # were the data read first, their error would come first
    for image in unreadable.rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="--patch-size 4"):
        train(str(unreadable), "smoke", tmp_path / "train", device="cpu", init=source)
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_a_missing_file_and_an_unreadable_one_say_what_init_takes(tmp_path):
    with pytest.raises(ValueError, match="no such file; give timm:<model name>"):
        initial_weights(str(tmp_path / "nothing.pt"), model_config("vit-tiny-test", image_size=32))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a timm VisionTransformer state dict nor a checkpoint"):
        initial_weights(str(tmp_path / "other.pt"), model_config("vit-tiny-test", image_size=32))


def test_a_failed_timm_download_is_one_clear_error(monkeypatch):
    def no_internet(name, pretrained=False, **kwargs):  # what create_model raises offline
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection")

    monkeypatch.setattr(timm, "create_model", no_internet)
    with pytest.raises(ValueError, match=r"timm could not give its pretrained weights \(We couldn't connect"):
        initial_weights("timm:vit_tiny_patch16_224", model_config("vit-tiny-test", image_size=32))


def test_the_finetune_presets_timm_weights_fit_its_model(monkeypatch):
    config = preset("finetune")
    name = config.init.removeprefix("timm:")
    asked = []

    def without_download(model_name, pretrained=False, **kwargs):
        asked.append((model_name, pretrained))
        return timm.models.create_model(model_name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", without_download)
    initial = initial_weights(config.init, {**architecture(config), "image_size": config.image_size})
    model = build_model(config, n_classes=20)
    model.load_state_dict({**model.state_dict(), **initial.state})
    assert asked == [(name, True)] and initial.description == f"timm {name} (pretrained)"
    assert config.lr < PRESETS["vit-ti16-224"].lr and config.epochs < PRESETS["vit-ti16-224"].epochs


def test_train_with_init_runs_one_smoke_epoch_from_the_file(tmp_path, capsys):
    source = saved(random_timm(img_size=48), tmp_path / "timm.pt")
    expected = initial_weights(source, model_config("vit-tiny-test", image_size=32)).state
    data = make_layout(tmp_path / "data", per_split=(6, 2, 2))
    output = tmp_path / "train"
    # With a vanishing learning rate the weights after the epoch are the initial ones, so the
    # checkpoint shows what the run started from.
    tiny_steps = ["--lr", "1e-12", "--min-lr", "0", "--weight-decay", "0"]
    main(["--data", str(data), "--output", str(output), "--epochs", "1", *tiny_steps, "--init", source])
    assert f"initial weights: timm state dict {source}" in capsys.readouterr().out
    last = checkpoints.load(output / "checkpoints" / "last.pt")
    for name, tensor in expected.items():
        torch.testing.assert_close(last["model"][name], tensor, msg=name)
    assert last["model"]["head.weight"].abs().max() < 1e-9 and last["train_config"]["init"] == source  # fresh head
