"""Images as the models see them: decoded once, resized, as uint8 arrays; and the conversion to
and from the models' input."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import torch

from components.common.data import DataVersion, load_rgb


def decode_split(data: DataVersion, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a split decoded once, resized to ``image_size`` square: uint8 (N, S, S, 3)
    and int64 labels (N,)."""
    frame = data.split(split)
    # OpenCV's bicubic when enlarging; pixel-area averaging when shrinking, which aliases less.
    resize = A.Resize(image_size, image_size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image")

    def decode(relative: str) -> np.ndarray:
        image = np.asarray(load_rgb(data.root / relative))
        return image if image.shape[:2] == (image_size, image_size) else resize(image=image)["image"]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = np.stack(list(pool.map(decode, frame["filepaths"])))
    return images, frame["class id"].to_numpy(dtype=np.int64, copy=True)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the paper's normalisation. Runs
    on whatever device the batch is on, so only uint8 bytes cross to the GPU."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def from_input(inputs: torch.Tensor) -> np.ndarray:
    """The inverse of `to_input`, for showing model inputs: float (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return inputs.add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
