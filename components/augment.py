"""Training augmentation, each part where it is cheapest.

- In the data-loader processes (CPU, albumentations): RandAugment's pixel operations
  (colour, equalise, posterise, ...), which cost about 0.1 ms an image, and every random
  draw of the other parts, seeded by (seed, epoch, image) so that a resumed run sees exactly
  the images an uninterrupted one would.
- On the training device, batched: the geometry (random-resized crop, horizontal flip and
  RandAugment's rotate/shear/translate) as one affine warp per image, random erasing, and
  mixup/cutmix. Warping is what made the CPU the bottleneck (0.3-0.45 ms an image for each
  OpenCV warp at 224); on a GPU a batch of warps costs well under a millisecond.

The pixel operations run before the geometric ones (RandAugment draws their order at random;
a fixed order changes little and lets the warps run together).
"""

from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from components.presets import TrainConfig

# Before any augmentation runs: an OpenCV thread pool started in the main process deadlocks the
# loader processes forked from it (seen on the GPU machine), and they are faster single-threaded.
cv2.setNumThreads(1)

# RandAugment's operations (Cubuk et al. 2020) at a fixed, moderate magnitude. Geometric ones
# are drawn as the inverse maps the warp needs (output -> input coordinates, the image
# spanning [-1, 1]); their ranges are symmetric, so the inverse of a drawn map is drawn alike.
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
ROTATE_DEGREES, SHEAR_DEGREES, TRANSLATE_FRACTION = 20.0, 15.0, 0.15


def pixel_ops() -> list[A.BasicTransform]:
    """RandAugment's operations that change pixel values but not where they are."""
    return [
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0),
        A.Equalize(p=1.0),
        A.AutoContrast(p=1.0),
        A.Posterize(num_bits=(4, 6), p=1.0),
        A.Solarize(p=1.0),
        A.Sharpen(p=1.0),
    ]


class AugmentedImages(Dataset):
    """Decoded uint8 images (N, S, S, 3) -> per (epoch, index): the image (S, S, 3) after the
    pixel operations, its label, its warp (2, 3) and its erased box (4,) (top, left, height,
    width as fractions of the side; all zero for none), for `augment_on_device` (which skips
    erasing for ``boxes=None`` when ``random_erasing`` is 0)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, config: TrainConfig):
        self.images, self.labels, self.config = images, labels, config
        self.pixel_ops = [A.Compose([op]) for op in pixel_ops()]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        epoch, index = key
        rng = np.random.default_rng([self.config.seed, epoch, index])
        image = self.images[index]
        ops = rng.permutation(len(GEOMETRIC_OPS) + len(self.pixel_ops))[: self.config.rand_augment]
        for op in ops[ops >= len(GEOMETRIC_OPS)] - len(GEOMETRIC_OPS):
            self.pixel_ops[op].set_random_seed(int(rng.integers(2**31)))
            image = self.pixel_ops[op](image=image)["image"]
        geometry = random_geometry(rng, self.config, [GEOMETRIC_OPS[op] for op in ops if op < len(GEOMETRIC_OPS)])
        return image, self.labels[index], geometry, random_erasing_box(rng, self.config.random_erasing)


def random_geometry(rng: np.random.Generator, config: TrainConfig, ops: list[str]) -> np.ndarray:
    """The (2, 3) map from output to input coordinates (``F.affine_grid``'s ``theta``) of a
    random-resized crop, then a flip, then the given RandAugment ops."""
    width = height = 1.0
    for _ in range(10 if config.crop_scale < 1 else 0):  # as torchvision draws them: retried
        area = rng.uniform(config.crop_scale, 1.0)  # until the crop fits, else the whole image
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        if area * aspect <= 1 and area / aspect <= 1:
            width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
            break
    center = rng.uniform(-1.0, 1.0, 2) * (1.0 - np.array([width, height]))
    crop = np.array([[width, 0.0, center[0]], [0.0, height, center[1]], [0.0, 0.0, 1.0]])
    flip = np.diag([-1.0 if config.hflip and rng.random() < 0.5 else 1.0, 1.0, 1.0])
    theta = crop @ flip
    for op in ops:
        theta = theta @ _geometric_op(op, rng)
    return theta[:2].astype(np.float32)


def _geometric_op(op: str, rng: np.random.Generator) -> np.ndarray:
    matrix = np.eye(3)
    if op == "rotate":
        angle = math.radians(rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES))
        matrix[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    elif op.startswith("shear"):
        shear = math.tan(math.radians(rng.uniform(-SHEAR_DEGREES, SHEAR_DEGREES)))
        matrix[(0, 1) if op == "shear_x" else (1, 0)] = shear
    else:
        matrix[0 if op == "translate_x" else 1, 2] = 2 * rng.uniform(-TRANSLATE_FRACTION, TRANSLATE_FRACTION)
    return matrix


def random_erasing_box(rng: np.random.Generator, probability: float) -> np.ndarray:
    """(top, left, height, width) as fractions of the side, all zero when nothing is erased:
    1/50 to 1/3 of the area, aspect ratio 0.3 to 3.3, as in DeiT."""
    box = np.zeros(4, np.float32)
    if rng.random() < probability:
        area = rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        height, width = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
        box[:] = rng.uniform(0.0, 1.0 - height), rng.uniform(0.0, 1.0 - width), height, width
    return box


def augment_on_device(images: torch.Tensor, geometry: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """uint8 images (B, S, S, 3), warps (B, 2, 3) and erased boxes (B, 4) or None -> float model
    input (B, 3, S, S) in [-1, 1]; erased boxes hold random pixels. Runs on whatever device the
    tensors are on, without a host-device synchronisation."""
    pixels = images.permute(0, 3, 1, 2).contiguous().float()
    grid = F.affine_grid(geometry.float(), list(pixels.shape), align_corners=False)
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = warped.div_(127.5).sub_(1.0)
    if boxes is None:
        return x
    side = (torch.arange(x.shape[-1], device=x.device) + 0.5) / x.shape[-1]
    top, left, height, width = boxes.float().unbind(1)
    rows = (side >= top[:, None]) & (side < (top + height)[:, None])
    columns = (side >= left[:, None]) & (side < (left + width)[:, None])
    erased = (rows[:, :, None] & columns[:, None, :])[:, None]
    return torch.where(erased, torch.rand_like(x).mul_(2.0).sub_(1.0), x)


def mix(images: torch.Tensor, targets: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of them per batch, when both are on) with the batch reversed:
    images (B, C, H, W), soft targets (B, K)."""
    choices = [kind for kind, alpha in (("mixup", config.mixup_alpha), ("cutmix", config.cutmix_alpha)) if alpha > 0]
    if not choices:
        return images, targets
    kind = choices[int(torch.randint(len(choices), ()))]
    alpha = config.mixup_alpha if kind == "mixup" else config.cutmix_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if kind == "mixup":
        images = images * lam + images.flip(0) * (1 - lam)
    else:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        top, left = int(torch.randint(height - cut_h + 1, ())), int(torch.randint(width - cut_w + 1, ()))
        rows, columns = slice(top, top + cut_h), slice(left, left + cut_w)
        images = images.clone()
        images[..., rows, columns] = images.flip(0)[..., rows, columns]
        lam = 1 - cut_h * cut_w / (height * width)
    return images, targets * lam + targets.flip(0) * (1 - lam)
