"""A Vision Transformer written from scratch (Dosovitskiy et al., 2020)."""

from model.pos_embed import resize_pos_embed
from model.presets import MODEL_PRESETS, model_config
from model.vit import (
    ATTENTION_IMPLEMENTATIONS,
    MLP,
    STEMS,
    ConvTokenizer,
    EncoderBlock,
    LinearProjector,
    MultiHeadSelfAttention,
    PatchEmbedder,
    ScaledDotProductAttention,
    ViT,
    check_stem,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "MLP",
    "MODEL_PRESETS",
    "STEMS",
    "ConvTokenizer",
    "EncoderBlock",
    "LinearProjector",
    "MultiHeadSelfAttention",
    "PatchEmbedder",
    "ScaledDotProductAttention",
    "ViT",
    "check_stem",
    "model_config",
    "resize_pos_embed",
]
