"""The standard ViT sizes (paper table 1; Ti from DeiT) as ``ViT`` constructor arguments."""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    # A few thousand parameters: for tests and the CPU smoke run.
    "vit-tiny-test": dict(patch_size=8, embed_dim=32, qkv_dim=16, mlp_hidden_size=64, n_layers=2, n_heads=2),
    # Six narrow blocks: what two CPU cores train for many epochs in minutes (benchmarks/RESULTS.md,
    # "CPU timings").
    "vit-mini": dict(patch_size=8, embed_dim=128, qkv_dim=32, mlp_hidden_size=256, n_layers=6, n_heads=4),
    "vit-ti16": dict(patch_size=16, embed_dim=192, qkv_dim=64, mlp_hidden_size=768, n_layers=12, n_heads=3),
    "vit-s16": dict(patch_size=16, embed_dim=384, qkv_dim=64, mlp_hidden_size=1536, n_layers=12, n_heads=6),
    "vit-b16": dict(patch_size=16, embed_dim=768, qkv_dim=64, mlp_hidden_size=3072, n_layers=12, n_heads=12),
}


def model_config(preset: str, **overrides) -> dict:
    """Constructor arguments of a named size, with any of them overridden."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return {**MODEL_PRESETS[preset], **overrides}
