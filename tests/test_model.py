"""The ViT against independent references (timm's VisionTransformer and resample_abs_pos_embed),
and its convolutional tokenizer against what the position embeddings assume of tokens."""

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from model import ATTENTION_IMPLEMENTATIONS, MODEL_PRESETS, ConvTokenizer, ViT, model_config, resize_pos_embed

SMALL = dict(patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


def random_timm_vit(img_size=224, num_classes=20, **kwargs):
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, num_classes=num_classes, **{**SMALL, **kwargs}
    )
    with torch.no_grad():  # timm zero-initialises some tensors; make every one matter
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
def test_from_timm_matches_timm_at_224_and_after_resizing_to_384(attention):
    reference = random_timm_vit()
    ours = ViT.from_timm(reference, attention=attention).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-4

    reference.set_input_size(img_size=384)
    ours.set_image_size(384)
    images = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-4


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
def test_sharper_attention_at_384_matches_timm_with_the_same_temperature(attention):
    reference = random_timm_vit()
    ours = ViT.from_timm(reference, attention=attention).eval()
    reference.set_input_size(img_size=384)
    ours.set_image_size(384).set_attention_scale(1.3)
    for block in reference.blocks:  # timm's explicit path multiplies Q by attn.scale
        block.attn.fused_attn, block.attn.scale = False, 1.3 * block.attn.head_dim**-0.5
    images = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-4
        rebuilt = ViT(**ours.config).eval()  # a checkpoint keeps the scale
        rebuilt.load_state_dict(ours.state_dict())
        assert (rebuilt(images) - ours(images)).abs().max() <= 1e-5
        ours.set_attention_scale(1.0)  # back to the paper's attention
        for block in reference.blocks:
            block.attn.scale = block.attn.head_dim**-0.5
        assert (ours(images) - reference(images)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "old_grid, new_grid, mode, antialias",
    [
        ((14, 14), (24, 24), "bicubic", True),
        ((14, 14), (24, 24), "bilinear", False),
        ((14, 14), (7, 7), "bicubic", True),
        ((14, 14), (7, 7), "bilinear", True),
        ((14, 14), (10, 20), "bicubic", True),
        ((6, 9), (12, 5), "bilinear", True),
    ],
)
def test_resize_pos_embed_equals_timm(old_grid, new_grid, mode, antialias):
    pos_embed = torch.randn(1, 1 + old_grid[0] * old_grid[1], 32)
    ours = resize_pos_embed(pos_embed, old_grid, new_grid, mode=mode, antialias=antialias)
    reference = resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=1,
        interpolation=mode,
        antialias=antialias,
    )
    assert ours.shape == (1, 1 + new_grid[0] * new_grid[1], 32)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, 0], pos_embed[:, 0], rtol=0, atol=0)


def test_resize_pos_embed_to_the_same_grid_returns_the_input():
    pos_embed = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_pos_embed(pos_embed, (14, 14), (14, 14)) is pos_embed


def test_resize_pos_embed_rejects_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match=r"\(1, 197, D\) for a 14x14 grid"):
        resize_pos_embed(torch.randn(1, 50, 8), (14, 14), (24, 24))


def tiny_vit(attention, **overrides):
    torch.manual_seed(1)
    config = model_config("vit-tiny-test", image_size=32, n_classes=5, attention=attention, **overrides)
    model = ViT(**config)
    with torch.no_grad():  # the paper's init zeroes the head; random weights test more
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("source", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("target", ATTENTION_IMPLEMENTATIONS)
def test_to_attention_gives_the_same_logits(source, target):
    model = tiny_vit(source).eval()
    images = torch.randn(4, 3, 32, 32)
    converted = model.to_attention(target)
    assert converted.config["attention"] == target
    with torch.no_grad():
        assert (converted(images) - model(images)).abs().max() <= 1e-5
        back = converted.to_attention(source)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_checkpoints_share_one_layout_whatever_the_implementation():
    keys = {attention: list(tiny_vit(attention).state_dict()) for attention in ATTENTION_IMPLEMENTATIONS}
    assert keys["separate"] == keys["fused"] == keys["sdpa"]
    assert "blocks.0.attn.qkv.weight" in keys["separate"]


def test_separate_heads_really_have_their_own_projections():
    model = tiny_vit("separate")
    attn = model.blocks[0].attn
    assert len(attn.heads) == 2 and not hasattr(attn, "qkv")
    qkv = model.state_dict()["blocks.0.attn.qkv.weight"]  # rows: [q heads; k heads; v heads]
    torch.testing.assert_close(qkv[16:32], attn.heads[1].q.weight)
    torch.testing.assert_close(qkv[32:48], attn.heads[0].k.weight)
    torch.testing.assert_close(qkv[80:96], attn.heads[1].v.weight)


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
def test_every_parameter_receives_a_gradient(attention):
    model = tiny_vit(attention, drop_path_rate=0.1, dropout_rate=0.1).train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    "preset, timm_name",
    [("vit-ti16", "vit_tiny_patch16_224"), ("vit-s16", "vit_small_patch16_224"), ("vit-b16", "vit_base_patch16_224")],
)
def test_preset_parameter_counts_equal_timm(preset, timm_name):
    ours = ViT(**model_config(preset, image_size=224, n_classes=20), attention="fused")
    reference = timm.create_model(timm_name, pretrained=False, num_classes=20)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ours) == count(reference)
    assert count(ours.to_attention("separate")) == count(reference)


def test_every_preset_builds_and_runs():
    for preset in MODEL_PRESETS:
        model = ViT(**model_config(preset, image_size=32, n_classes=3, n_layers=1))
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_wrong_image_size_says_how_to_fix_it():
    model = tiny_vit("sdpa")
    with pytest.raises(ValueError, match=r"for 32x32 images.*got 48x48.*set_image_size\(48\)"):
        model(torch.randn(1, 3, 48, 48))


def test_set_image_size_switches_for_good_and_keeps_the_class_token():
    model = tiny_vit("sdpa").eval()
    class_embed = model.projector.pos_embed[:, 0].clone()
    assert model.set_image_size((48, 64)) is model
    assert model.config["image_size"] == [48, 64]
    assert model.projector.pos_embed.shape == (1, 1 + 6 * 8, 32)
    torch.testing.assert_close(model.projector.pos_embed[:, 0], class_embed)
    assert model(torch.randn(2, 3, 48, 64)).shape == (2, 5)
    rebuilt = ViT(**model.config)  # a checkpoint's config rebuilds the resized architecture
    rebuilt.load_state_dict(model.state_dict())


def test_images_of_another_size_can_borrow_interpolated_position_embeddings_for_one_call():
    # How the trainer trains at several sizes: the same function as the model resized for good
    # (the paper's interpolation), but the model keeps its size and one set of embeddings, which
    # the gradient of every size trains.
    model = tiny_vit("sdpa").eval()
    images = torch.randn(2, 3, 48, 40)
    resized = ViT(**model.config)
    resized.load_state_dict(model.state_dict())
    resized.set_image_size((48, 40)).eval()
    torch.testing.assert_close(model(images, interpolate_pos_embed=True), resized(images))
    assert model.config["image_size"] == [32, 32] and model.projector.pos_embed.shape == (1, 1 + 4 * 4, 32)
    model(images, interpolate_pos_embed=True).sum().backward()
    assert model.projector.pos_embed.grad.shape == (1, 17, 32) and model.projector.pos_embed.grad[:, 1:].abs().min() > 0
    with pytest.raises(ValueError, match="any size must be a multiple of the patch size 8"):
        model(torch.randn(1, 3, 44, 44), interpolate_pos_embed=True)


def test_the_convolutional_tokenizer_puts_each_token_where_its_patch_is():
    # Its tokens must lie on the patch grid in the patches' row-major order, or the position
    # embeddings (and their interpolation to another size) would describe the wrong places. A
    # spot in patch (r, c) of a non-square image changes the tokens around (r, c) only.
    model = ViT(**model_config("vit-tiny-test", image_size=(24, 32), patch_size=4, stem="conv", n_classes=3))
    tokenizer = model.projector.patch_embedder.eval()
    blank = torch.zeros(1, 3, 24, 32)
    for row, column in [(1, 6), (4, 2)]:
        spot = blank.clone()
        spot[:, :, 4 * row + 1, 4 * column + 1] = 5.0  # what 13x13 pixels around it see: tokens r-1 to r+1
        changed = (tokenizer(spot) - tokenizer(blank)).abs().sum(-1)[0].nonzero().flatten().tolist()
        assert row * 8 + column in changed
        assert all(abs(i // 8 - row) <= 1 and abs(i % 8 - column) <= 1 for i in changed), changed
    assert model(torch.randn(2, 3, 24, 32)).shape == (2, 3)
    assert model.projector.pos_embed.shape == (1, 1 + 6 * 8, 32)


def test_a_model_with_the_convolutional_tokenizer_interpolates_and_rebuilds_like_the_paper_model():
    model = ViT(**model_config("vit-tiny-test", image_size=24, patch_size=4, stem="conv", n_classes=3)).eval()
    images = torch.randn(2, 3, 48, 48)
    borrowed = model(images, interpolate_pos_embed=True)
    rebuilt = ViT(**model.config)  # a checkpoint's config: the stem comes back with it
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.set_image_size(48).eval()(images), borrowed)
    assert rebuilt.projector.pos_embed.shape == (1, 1 + 12 * 12, 32)
    assert isinstance(rebuilt.projector.patch_embedder, ConvTokenizer)


@pytest.mark.parametrize(
    "stem, patch_size, message",
    [
        ("conv", 6, "power-of-2 patch size from 2 on, not 6"),
        ("conv", 1, "not 1"),
        ("cnn", 8, "choose one of linear, conv"),
    ],
)
def test_a_stem_that_cannot_make_the_tokens_says_what_to_choose(stem, patch_size, message):
    with pytest.raises(ValueError, match=message):
        ViT(**model_config("vit-tiny-test", image_size=24, patch_size=patch_size, stem=stem))


def test_the_paper_initialisation_starts_from_a_zero_head_and_uniform_predictions():
    model = ViT(**model_config("vit-tiny-test", image_size=32, n_classes=5)).eval()
    assert torch.count_nonzero(model.head.weight) == 0
    torch.testing.assert_close(model(torch.randn(2, 3, 32, 32)).softmax(-1), torch.full((2, 5), 0.2))
    qkv = model.state_dict()["blocks.0.attn.qkv.weight"]
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5  # Xavier on the fused matrix
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound


def test_from_timm_refuses_models_it_cannot_express():
    with pytest.raises(ValueError, match="register tokens"):
        ViT.from_timm(random_timm_vit(reg_tokens=4))
