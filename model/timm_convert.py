"""Conversion of a timm ``VisionTransformer`` into our ``ViT`` (same function, our layout)."""

from __future__ import annotations

import math

import torch
from torch import nn


def config_from_timm(timm_model: nn.Module) -> dict:
    """Our constructor arguments for a timm ``VisionTransformer``; refuses variants we lack."""
    unsupported = {
        "no class token": not getattr(timm_model, "has_class_token", False),
        "register tokens": getattr(timm_model, "num_reg_tokens", 0) > 0,
        "pooling other than the class token": getattr(timm_model, "global_pool", "token") != "token",
        "a pre-norm before the blocks": not isinstance(timm_model.norm_pre, nn.Identity),
        "an fc_norm after pooling": not isinstance(timm_model.fc_norm, nn.Identity),
        "layer scale": any(not isinstance(block.ls1, nn.Identity) for block in timm_model.blocks),
        "QK-norm": any(not isinstance(block.attn.q_norm, nn.Identity) for block in timm_model.blocks),
        "no position embedding": timm_model.pos_embed is None,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"cannot convert this timm model, it has {', '.join(found)}")
    first = timm_model.blocks[0]
    return dict(
        image_size=tuple(timm_model.patch_embed.img_size),
        patch_size=timm_model.patch_embed.patch_size[0],
        in_channels=timm_model.patch_embed.proj.in_channels,
        embed_dim=timm_model.embed_dim,
        qkv_dim=first.attn.head_dim,
        mlp_hidden_size=first.mlp.fc1.out_features,
        n_layers=len(timm_model.blocks),
        n_heads=first.attn.num_heads,
        n_classes=timm_model.num_classes,
    )


TIMM_TO_OURS = {
    "patch_embed.proj.": "projector.patch_embedder.proj.",
    "cls_token": "projector.class_token",
    "pos_embed": "projector.pos_embed",
}  # everything else (blocks.N.attn.qkv, ..., norm, head) has the same name and layout


def _rename(state: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        renamed[name] = tensor
    return renamed


PATCH_WEIGHT = "projector.patch_embedder.proj.weight"  # ours (D, C p p); timm's convolution (D, C, p, p)


def state_dict_from_timm(timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's parameters -> ours."""
    return timm_state_to_ours(timm_model.state_dict())


def timm_state_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer``'s state dict -> ours."""
    state = _rename(state, TIMM_TO_OURS)
    state[PATCH_WEIGHT] = state[PATCH_WEIGHT].flatten(1)
    return state


TIMM_VARIANT_KEYS = {
    "reg_token": "register tokens",
    "norm_pre.weight": "a pre-norm before the blocks",
    "fc_norm.weight": "an fc_norm after pooling",
    "blocks.0.ls1.gamma": "layer scale",
    "blocks.0.attn.q_norm.weight": "QK-norm",
}


def architecture_from_timm_state(state: dict[str, torch.Tensor]) -> dict:
    """What a timm ``VisionTransformer``'s state dict says of its architecture: our
    ``patch_size, in_channels, embed_dim, mlp_hidden_size, n_layers``, its ``attention_width``
    (h d: the state holds no head count) and ``grid``, the square patch grid of its position
    embeddings. Refuses the variants ``config_from_timm`` refuses."""
    found = [name for key, name in TIMM_VARIANT_KEYS.items() if key in state]
    found += [
        name
        for key, name in (("cls_token", "no class token"), ("pos_embed", "no position embedding"))
        if key not in state
    ]
    if found:
        raise ValueError(f"cannot convert this timm model, it has {', '.join(found)}")
    embed_dim, in_channels, patch_size, _ = state["patch_embed.proj.weight"].shape
    patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"its {patches + 1} position embeddings are not a class token plus a square patch grid")
    return dict(
        patch_size=patch_size,
        in_channels=in_channels,
        embed_dim=embed_dim,
        mlp_hidden_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        n_layers=len({key.split(".")[1] for key in state if key.startswith("blocks.")}),
        attention_width=state["blocks.0.attn.qkv.weight"].shape[0] // 3,
        grid=(side, side),
    )


def state_dict_to_timm(state: dict[str, torch.Tensor], patch_size: int) -> dict[str, torch.Tensor]:
    """Our parameters -> timm's."""
    weight = state[PATCH_WEIGHT]
    state = {**state, PATCH_WEIGHT: weight.reshape(len(weight), -1, patch_size, patch_size)}
    return _rename(state, {ours: theirs for theirs, ours in TIMM_TO_OURS.items()})


def timm_vit(config: dict, image_size: int, n_classes: int) -> nn.Module:
    """A timm ``VisionTransformer`` of the architecture our ``config`` describes (needs timm)."""
    from timm.models.vision_transformer import VisionTransformer

    if config["embed_dim"] != config["n_heads"] * config["qkv_dim"]:
        raise ValueError("timm's ViT needs embed_dim == n_heads * qkv_dim")
    return VisionTransformer(
        img_size=image_size,
        patch_size=config["patch_size"],
        embed_dim=config["embed_dim"],
        depth=config["n_layers"],
        num_heads=config["n_heads"],
        mlp_ratio=config["mlp_hidden_size"] / config["embed_dim"],
        num_classes=n_classes,
    )
