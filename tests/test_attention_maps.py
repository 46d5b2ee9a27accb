"""Attention maps: the weights recorded are the ones the model computes, rollout is what Abnar
and Zuidema define, a model that looks at one patch is drawn looking there, and getting the
maps changes nothing about the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.common import checkpoints
from components.common.attention_maps import attention_figure, attention_sample
from components.evaluate import evaluate
from model import ATTENTION_IMPLEMENTATIONS, ViT, model_config
from model.attention_maps import attention_maps, attention_rollout, attention_weights
from tests.archives import CLASSES, make_layout


def random_model(attention="sdpa", image_size=32, n_layers=2) -> ViT:
    torch.manual_seed(0)
    model = ViT(
        **model_config("vit-tiny-test", image_size=image_size, n_classes=3, attention=attention, n_layers=n_layers)
    )
    with torch.no_grad():  # opinions everywhere, not the init's zero head
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model.eval()


def test_rollout_rows_sum_to_one():
    _, attentions = attention_weights(random_model(n_layers=3), torch.randn(2, 3, 32, 32))
    rollout = attention_rollout(attentions)
    assert rollout.shape == (2, 17, 17) and (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))


def test_rollout_of_one_block_is_the_head_mean_plus_identity_normalised():
    weights = torch.rand(1, 2, 3, 3).softmax(-1)
    expected = (weights.mean(1) + torch.eye(3)) / 2  # rows of the mean sum to one, of the identity too
    torch.testing.assert_close(attention_rollout([weights]), expected)
    torch.testing.assert_close(attention_rollout([weights, weights]), expected @ expected)


def test_the_maps_have_the_patch_grids_shape():
    model = random_model(image_size=(32, 48))  # an 4x6 grid of 8-pixel patches
    maps = attention_maps(model, torch.randn(3, 3, 32, 48))
    assert maps["rollout"].shape == (3, 4, 6)
    assert maps["last_block"].shape == (3, 2, 4, 6)  # two heads
    assert maps["logits"].shape == (3, 3)


def one_patch_model(patch: int) -> ViT:
    """Every token, the class token too, attends only to ``patch`` in every head of every
    block: the patch embeddings are zero, so only ``patch``'s position embedding makes its
    normalised token non-zero; keys copy the token, every query is a huge multiple of that
    key. Blocks add nothing to the residual stream, so every block sees the same tokens."""
    model = ViT(**model_config("vit-tiny-test", image_size=32, n_classes=3))
    width, heads, head_dim = 32, 2, 16
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.fill_(1.0)
        marker = torch.zeros(width)
        marker[:2] = torch.tensor([1.0, -1.0])
        model.projector.pos_embed[0, 1 + patch] = marker
        key_of_patch = F.layer_norm(marker, (width,), eps=1e-6)[:head_dim]
        for block in model.blocks:
            qkv = block.attn.qkv
            for head in range(heads):
                rows = slice((heads + head) * head_dim, (heads + head + 1) * head_dim)  # K of this head
                qkv.weight[rows, :head_dim] = torch.eye(head_dim)
                qkv.bias[head * head_dim : (head + 1) * head_dim] = 100.0 * key_of_patch  # its Q
    return model.eval()


@pytest.mark.parametrize("patch", [0, 5, 15])
def test_a_model_whose_class_token_attends_to_one_patch_puts_its_maps_there(patch):
    maps = attention_maps(one_patch_model(patch), torch.randn(2, 3, 32, 32))
    expected = torch.zeros(4, 4)
    expected.view(-1)[patch] = 1.0
    for image in range(2):
        rollout = maps["rollout"][image]
        torch.testing.assert_close(rollout / rollout.sum(), expected)
        for head in maps["last_block"][image]:
            torch.testing.assert_close(head, expected)


def test_the_recorded_weights_are_the_softmax_sdpa_computes_with():
    model = random_model("sdpa")
    images = torch.randn(2, 3, 32, 32)
    logits, attentions = attention_weights(model, images)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-5)
        attn = model.blocks[0].attn
        tokens = model.blocks[0].norm1(model.projector(images))
        q, k, v = attn.qkv(tokens).view(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attentions[0] @ v, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 2, 17))


@pytest.mark.parametrize("attention", ATTENTION_IMPLEMENTATIONS)
def test_getting_the_maps_leaves_the_model_as_it_was(attention):
    model = random_model(attention).train()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    before = model(images)
    attention_maps(model, images)
    torch.manual_seed(1)
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    assert model.training and all(block.attn.attention == attention for block in model.blocks)
    assert not any(module._forward_hooks for module in model.modules())


def test_the_sample_is_half_misclassified_seeded_and_falls_back_when_one_kind_is_short():
    labels = np.arange(40) % 4
    predictions = np.where(np.arange(40) < 30, labels, (labels + 1) % 4)  # 30 right, 10 wrong
    sample = attention_sample(labels, predictions, count=8)
    assert len(set(sample.tolist())) == 8
    assert (predictions[sample[:4]] == labels[sample[:4]]).all()
    assert (predictions[sample[4:]] != labels[sample[4:]]).all()
    assert np.array_equal(sample, attention_sample(labels, predictions, count=8))
    assert not np.array_equal(sample, attention_sample(labels, predictions, count=8, seed=1))
    assert len(attention_sample(labels, labels, count=8)) == 8  # nothing wrong: all correct ones
    assert len(attention_sample(labels[:3], predictions[:3], count=8)) == 3


def test_the_figure_shows_each_view_of_each_image_titled_with_true_and_predicted(tmp_path):
    small, large = random_model(), random_model().set_image_size(48)
    rng = np.random.default_rng(0)
    images32, images48 = rng.integers(0, 255, (3, 32, 32, 3), np.uint8), rng.integers(0, 255, (3, 48, 48, 3), np.uint8)
    labels = np.array([0, 1, 2])
    figure = attention_figure({"at 32": (small, images32), "at 48": (large, images48)}, labels, CLASSES)
    path = tmp_path / "maps.png"
    figure.savefig(path, dpi=60)
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    assert len(panels) == 3 * 2 * (1 + 2)  # images x views x (rollout + heads)
    titles = [axis.get_title() for axis in panels if axis.get_title().startswith("true")]
    assert len(titles) == 6 and all("predicted" in title for title in titles)
    assert titles[0].startswith(f"true {CLASSES[0]}")
    assert Image.open(path).size[0] > Image.open(path).size[1]  # side by side


def test_evaluate_saves_and_lists_the_attention_maps(tmp_path):
    model = random_model()
    path = tmp_path / "model.pt"
    checkpoints.save_atomic(checkpoints.payload(model.state_dict(), model.config, CLASSES), path)
    folder = make_layout(tmp_path / "data", per_split=(2, 2, 4))
    result = evaluate(path, str(folder), tmp_path / "eval" / "evaluate.json", device="cpu")
    maps = tmp_path / "eval" / "evaluate.attention_maps.png"
    listed = [plot["path"] for plot in result["plots"]]
    assert str(maps) in listed and maps.is_file() and Image.open(maps).size[0] > 300
    written = json.loads((tmp_path / "eval" / "evaluate.json").read_text())["plots"]
    assert str(maps) in [plot["path"] for plot in written]
