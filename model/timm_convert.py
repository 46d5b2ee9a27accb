"""Conversion of a timm ``VisionTransformer`` into our ``ViT`` (same function, our layout)."""

from __future__ import annotations

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


def state_dict_from_timm(timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's parameter names -> ours; the qkv layout is the same."""
    renames = {
        "patch_embed.proj.": "projector.patch_embedder.proj.",
        "cls_token": "projector.class_token",
        "pos_embed": "projector.pos_embed",
    }
    state = {}
    for name, tensor in timm_model.state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        state[name] = tensor
    return state
