"""Resizing learned position embeddings to another patch grid, the paper's way (section 3.2):
2D interpolation of the patch embeddings according to their location in the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """(1, 1 + h*w, D) -> (1, 1 + H*W, D): the class token's embedding is kept, the h x w grid
    of patch embeddings is interpolated to H x W (any grid, square or not).

    ``mode`` is ``"bicubic"`` or ``"bilinear"``. ``antialias`` is passed to
    ``F.interpolate``: it low-pass filters when the grid shrinks (and, for bicubic, uses the
    PIL kernel when it grows), exactly as timm's ``resample_abs_pos_embed`` does. The
    interpolation runs in float32 and the result keeps the input's dtype.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    expected = 1 + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"expected position embeddings of shape (1, {expected}, D) for a {old_grid[0]}x{old_grid[1]} "
            f"grid plus the class token, got {tuple(pos_embed.shape)}"
        )
    if new_grid == old_grid:
        return pos_embed
    class_embed, patch_embed = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_embed = patch_embed.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    patch_embed = F.interpolate(patch_embed, size=new_grid, mode=mode, antialias=antialias, align_corners=False)
    patch_embed = patch_embed.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([class_embed, patch_embed.to(pos_embed.dtype)], dim=1)
