"""Where a ViT looks: its attention weights on demand, and attention rollout (Abnar and
Zuidema, "Quantifying Attention Flow in Transformers", 2020).

The training paths (``sdpa``, ``fused``, ``separate``) are left as they are: the weights are
recorded from a ``fused`` copy of the model, which holds the same weights (one state-dict
layout) and computes softmax(scale Q K^T) explicitly. Each block's weights are the input of
its attention dropout, where a forward hook reads them.

Shapes: N images, h heads, L blocks, T = 1 + gh gw tokens (the class token first).
"""

from __future__ import annotations

import torch

from model.vit import ViT


@torch.no_grad()
def attention_weights(model: ViT, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits (N, K) and each block's attention weights, L tensors (N, h, T, T) whose rows
    sum to one, for ``images`` (N, C, H, W) at the model's size. ``model`` itself is not
    changed (neither its implementation nor its mode)."""
    explicit = model.to_attention("fused").eval()
    recorded: list[torch.Tensor] = []
    hooks = [
        block.attn.attn_dropout.register_forward_hook(lambda _module, inputs, _output: recorded.append(inputs[0]))
        for block in explicit.blocks
    ]
    try:
        logits = explicit(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [weights.float() for weights in recorded]


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout, (N, T, T): per block the heads' mean plus the identity (the residual
    path), rows normalised to sum to one, multiplied from the first block to the last. Row i
    says how much each input token flows into token i at the output."""
    rollout = None
    for weights in attentions:
        mixed = weights.mean(dim=1) + torch.eye(weights.shape[-1], device=weights.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def class_token_maps(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The class token's row over the patches as images: (..., T, T) -> (..., gh, gw)."""
    return attention[..., 0, 1:].reshape(*attention.shape[:-2], *grid)


def attention_maps(model: ViT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """For ``images`` (N, C, H, W): ``"logits"`` (N, K), ``"rollout"`` (N, gh, gw), the class
    token's attention rolled out over all blocks, and ``"last_block"`` (N, h, gh, gw), the
    last block's class-token attention per head."""
    logits, attentions = attention_weights(model, images)
    grid = model.projector.grid
    return {
        "logits": logits,
        "rollout": class_token_maps(attention_rollout(attentions), grid),
        "last_block": class_token_maps(attentions[-1], grid),
    }
