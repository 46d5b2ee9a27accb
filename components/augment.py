"""Training augmentation, all of it on the training device, batched.

The decoded training images stay on the training device (uint8, 150 KB an image at 224: a
few hundred MB for these data sets). Loader processes only draw what happens to each image,
seeded by (seed, epoch, image) so that a resumed run sees exactly the images an uninterrupted
one would, and send those draws (about 100 bytes an image); `augment` then applies them to a
batch at once:

1. RandAugment (Cubuk et al. 2020): ``rand_augment`` of torchvision's 14 operations per
   image, each at a random strength. A pixel operation runs on the images that drew it; the
   geometric ones join
2. the random-resized crop and the horizontal flip in one affine warp per image;
3. random erasing (then, in `components.train`, mixup/cutmix: `mix`).

Why on the device: sending 38 MB of augmented pixels a batch from loader processes through
shared and pinned memory to the GPU held an H100 at 11,200 images/s, below the 14,600 of the
model's own training step. The pixel operations run before the geometric ones (RandAugment
draws their order at random; a fixed order changes little and lets the warps run together).
Nothing here synchronises the host with the device.
"""

from __future__ import annotations

import functools
import math
from itertools import product
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from components.presets import TrainConfig

# Strengths are drawn uniformly in [-1, 1] and scaled: at most these. Geometric ops are drawn as
# the inverse maps the warp needs (output -> input coordinates, the image spanning [-1, 1]);
# their ranges are symmetric, so the inverse of a drawn map is drawn alike.
ROTATE_DEGREES, SHEAR_DEGREES, TRANSLATE_FRACTION = 20.0, 15.0, 0.15
ENHANCE_STRENGTH = 0.4  # brightness, colour, contrast, sharpness: factors 0.6 to 1.4
POSTERIZE_BITS = (4, 5, 6)
SOLARIZE_THRESHOLD = 128

GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PIXEL_OPS = ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
RAND_AUGMENT_OPS = ("identity", *GEOMETRIC_OPS, *PIXEL_OPS)  # torchvision's RandAugment list


class Draws(NamedTuple):
    """What happens to a batch of B images; the tensors travel to the device, ``group_sizes``
    stays on the host so that splitting ``groups`` by it needs no synchronisation."""

    index: torch.Tensor  # int64 (B,): the images, rows of the split
    strength: torch.Tensor  # float32 (B, N): of each image's N RandAugment operations, in [-1, 1]
    geometry: torch.Tensor  # float32 (B, 2, 3): crop, flip, geometric operations as one map
    box: torch.Tensor | None  # float32 (B, 4): erased (top, left, height, width) or zeros; None: no erasing
    groups: torch.Tensor  # int64: batch positions grouped by (operation slot, pixel operation)
    group_sizes: tuple[int, ...]  # N x len(PIXEL_OPS) sizes of those groups


class RandomDraws(Dataset):
    """(epoch, index) -> that image's draws: its index, RandAugment operations (N,) and
    strengths (N,), warp (2, 3) and erased box (4,) (top, left, height, width as fractions of
    the side; all zero for none). `collate` makes a batch of them a `Draws`."""

    def __init__(self, size: int, config: TrainConfig):
        self.size, self.config = size, config

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        epoch, index = key
        rng = np.random.default_rng([self.config.seed, epoch, index])
        ops = rng.permutation(len(RAND_AUGMENT_OPS))[: self.config.rand_augment]
        strength = rng.uniform(-1.0, 1.0, len(ops)).astype(np.float32)
        geometric = [(RAND_AUGMENT_OPS[op], s) for op, s in zip(ops, strength) if RAND_AUGMENT_OPS[op] in GEOMETRIC_OPS]
        geometry = random_geometry(rng, self.config, geometric)
        return index, ops, strength, geometry, random_erasing_box(rng, self.config.random_erasing)

    def collate(self, items: list[tuple]) -> Draws:
        index, ops, strength, geometry, box = (torch.as_tensor(np.stack(part)) for part in zip(*items))
        pixel_op_ids = [RAND_AUGMENT_OPS.index(op) for op in PIXEL_OPS]
        groups = [
            torch.nonzero(ops[:, slot] == op).flatten() for slot, op in product(range(ops.shape[1]), pixel_op_ids)
        ]
        return Draws(
            index,
            strength,
            geometry,
            box if self.config.random_erasing > 0 else None,
            torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64),
            tuple(len(group) for group in groups),
        )


def random_geometry(rng: np.random.Generator, config: TrainConfig, ops: list[tuple[str, float]]) -> np.ndarray:
    """The (2, 3) map from output to input coordinates (``F.affine_grid``'s ``theta``) of a
    random-resized crop, then a flip, then the given geometric operations at their strengths."""
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
    for op, strength in ops:
        theta = theta @ _geometric_op(op, strength)
    return theta[:2].astype(np.float32)


def _geometric_op(op: str, strength: float) -> np.ndarray:
    matrix = np.eye(3)
    if op == "rotate":
        angle = math.radians(strength * ROTATE_DEGREES)
        matrix[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    elif op.startswith("shear"):
        matrix[(0, 1) if op == "shear_x" else (1, 0)] = math.tan(math.radians(strength * SHEAR_DEGREES))
    else:
        matrix[0 if op == "translate_x" else 1, 2] = 2 * strength * TRANSLATE_FRACTION
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


def augment(images: torch.Tensor, draws: Draws, compiled: bool = False, size: int | None = None) -> torch.Tensor:
    """uint8 images (N, S, S, 3) of the whole split and a batch's draws, both on the device ->
    float model input (B, 3, s, s) in [-1, 1] at s = ``size`` or S (the warp resamples). The
    pixel operations run in float16 on a GPU, where each of their passes is bound by memory
    traffic and 0-255 is exact in half precision; in float32 on a CPU, which is slow at half.
    ``compiled``: the warp and erasing through torch.compile, which fuses their dozen passes
    over the batch into a few kernels (on an H100 the eager augmentation took 2.1 ms a batch
    of 256, 15% of a step with CUDA graphs); the pixel operations stay eager, their group
    sizes change every batch."""
    dtype = torch.float16 if images.device.type == "cuda" and any(draws.group_sizes) else torch.float32
    batch = images.index_select(0, draws.index).permute(0, 3, 1, 2)
    pixels = batch.to(dtype, memory_format=torch.contiguous_format)
    transform = _compiled_warp() if compiled else warp
    return transform(rand_augment_pixels(pixels, draws), draws.geometry, draws.box, size or pixels.shape[-1])


@functools.cache
def _compiled_warp():
    return torch.compile(warp, dynamic=False)


def rand_augment_pixels(pixels: torch.Tensor, draws: Draws) -> torch.Tensor:
    """float (B, 3, S, S) in [0, 255] -> the same after each image's pixel operations, in its
    drawn order; each operation runs once per slot, on the images that drew it."""
    slots = range(len(draws.group_sizes) // len(PIXEL_OPS))
    for (slot, op), positions in zip(product(slots, PIXEL_OPS), draws.groups.split(draws.group_sizes)):
        if len(positions):
            strength = draws.strength[:, slot].index_select(0, positions)
            pixels.index_copy_(0, positions, PIXEL_OP_FUNCTIONS[op](pixels.index_select(0, positions), strength))
    return pixels


def warp(pixels: torch.Tensor, geometry: torch.Tensor, boxes: torch.Tensor | None, size: int) -> torch.Tensor:
    """float (B, 3, S, S) in [0, 255], warps (B, 2, 3) and erased boxes (B, 4) or None -> model
    input (B, 3, size, size) in [-1, 1] (outside the image: black); erased boxes hold random
    pixels."""
    grid = sampling_grid(geometry, size)  # float32: grid_sample at half gives NaN on a CPU
    x = F.grid_sample(pixels.float(), grid, padding_mode="zeros", align_corners=False).div_(127.5).sub_(1.0)
    if boxes is None:
        return x
    side = (torch.arange(x.shape[-1], device=x.device) + 0.5) / x.shape[-1]
    top, left, height, width = boxes.float().unbind(1)
    rows = (side >= top[:, None]) & (side < (top + height)[:, None])
    columns = (side >= left[:, None]) & (side < (left + width)[:, None])
    erased = (rows[:, :, None] & columns[:, None, :])[:, None]
    return torch.where(erased, torch.empty_like(x).uniform_(-1.0, 1.0), x)


def sampling_grid(geometry: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(geometry, (B, C, side, side), align_corners=False)``: the input position
    of each output pixel's centre, (B, side, side, 2), written out because affine_grid's batched
    matrix product with an inner size of 3 ran as a slow fp32 GEMM (3% of the H100's time)."""
    centres = (torch.arange(side, device=geometry.device, dtype=torch.float32) * 2 + 1) / side - 1
    x, y = centres.view(1, 1, side), centres.view(1, side, 1)
    theta = geometry.float()[..., None, None]  # (B, 2, 3, 1, 1)
    return torch.stack([theta[:, row, 0] * x + theta[:, row, 1] * y + theta[:, row, 2] for row in (0, 1)], dim=-1)


# --- RandAugment's pixel operations: float images (b, 3, S, S) in [0, 255], strengths (b,) in [-1, 1] ---
# torchvision's formulas (the tests hold them to torchvision's own functions on uint8 images,
# which truncate each result to an integer), with a factor or parameter per image instead of
# one per call, in as few kernels as eager PyTorch allows: with ~25 images an operation, each
# kernel is small and their number is what costs.

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601, as PIL and torchvision


def _enhance(pixels: torch.Tensor, degenerate: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor x (image - degenerate), factor 1 +- ENHANCE_STRENGTH."""
    factor = strength.mul(ENHANCE_STRENGTH).add_(1.0).to(pixels.dtype).view(-1, 1, 1, 1)
    return torch.lerp(degenerate, pixels, factor).clamp_(0, 255)


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY_WEIGHTS, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True).floor_()


def brightness(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    return _enhance(pixels, torch.zeros((), device=pixels.device, dtype=pixels.dtype), strength)


def color(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    return _enhance(pixels, _gray(pixels), strength)


def contrast(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    return _enhance(pixels, _gray(pixels).mean((1, 2, 3), keepdim=True), strength)


def sharpness(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Enhances the inside of the image against its 3x3 smoothing ([[1, 1, 1], [1, 5, 1],
    [1, 1, 1]] / 13: the 3x3 sum plus 4 x the centre, as an average pool, cheaper than a grouped
    convolution); the outermost pixels stay."""
    inside = pixels[..., 1:-1, 1:-1]
    smoothed = torch.add(inside, F.avg_pool2d(pixels, 3, stride=1), alpha=9 / 4).mul_(4 / 13).round_()
    output = pixels.clone()
    output[..., 1:-1, 1:-1] = _enhance(inside, smoothed, strength)
    return output


def posterize(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Keeps the top 4, 5 or 6 bits of each value."""
    levels = len(POSTERIZE_BITS)
    dropped_bits = 8 - POSTERIZE_BITS[0] - strength.add(1.0).mul_(levels / 2).floor_().clamp_(max=levels - 1)
    step = torch.exp2(dropped_bits).to(pixels.dtype).view(-1, 1, 1, 1)
    return pixels.div(step).floor_().mul_(step)


def solarize(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    return torch.where(pixels >= SOLARIZE_THRESHOLD, 255 - pixels, pixels)


def autocontrast(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to span 0 to 255 (a constant channel stays)."""
    low, high = pixels.amin((2, 3), keepdim=True), pixels.amax((2, 3), keepdim=True)
    scale = torch.where(high > low, 255 / (high - low), 1.0)
    return (pixels - torch.where(high > low, low, 0.0)).mul_(scale).clamp_(0, 255)


def equalize(pixels: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """torchvision's, which is batched (per image and channel) and free of synchronisations."""
    return TF.equalize(pixels.to(torch.uint8)).to(pixels.dtype)


PIXEL_OP_FUNCTIONS = {op: globals()[op] for op in PIXEL_OPS}


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
        images = torch.lerp(images.flip(0), images, lam)  # lam x images + (1 - lam) x reversed
    else:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        top, left = int(torch.randint(height - cut_h + 1, ())), int(torch.randint(width - cut_w + 1, ()))
        rows, columns = slice(top, top + cut_h), slice(left, left + cut_w)
        images = images.clone()
        images[..., rows, columns] = images[..., rows, columns].flip(0)
        lam = 1 - cut_h * cut_w / (height * width)
    return images, targets * lam + targets.flip(0) * (1 - lam)
