"""A Vision Transformer written from scratch (Dosovitskiy et al., 2020)."""

from model.pos_embed import resize_pos_embed
from model.presets import MODEL_PRESETS, model_config
from model.vit import (
    ATTENTION_IMPLEMENTATIONS,
    MLP,
    EncoderBlock,
    LinearProjector,
    MultiHeadSelfAttention,
    PatchEmbedder,
    ScaledDotProductAttention,
    ViT,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "MLP",
    "MODEL_PRESETS",
    "EncoderBlock",
    "LinearProjector",
    "MultiHeadSelfAttention",
    "PatchEmbedder",
    "ScaledDotProductAttention",
    "ViT",
    "model_config",
    "resize_pos_embed",
]
