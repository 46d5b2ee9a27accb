"""Training augmentation, all of it on the training device, batched.

The decoded training images stay on the training device (uint8, 150 KB an image at 224: a
few hundred MB for these data sets). At the start of each epoch the training process draws
what happens to every image, at once and seeded by (seed, epoch) alone, so that a resumed run
sees exactly the images an uninterrupted one would, and copies the epoch's draws to the device
in one go (about 100 bytes an image); `augment` then applies a batch's draws to the batch:

1. RandAugment (Cubuk et al. 2020): ``rand_augment`` of torchvision's 14 operations per
   image, each at a random strength. A pixel operation runs on the images that drew it; the
   geometric ones join
2. the random-resized crop and the horizontal flip in one affine warp per image;
3. random erasing (then, in `components.train`, mixup/cutmix: `mix`).

Why on the device: loader processes sending augmented pixels to the GPU could not keep up
with the model's own training step. Why an epoch at a time: drawn image by image, the draws
needed loader processes and the training loop still waited for their batches; drawn as
arrays, an epoch's draws cost a few milliseconds of one CPU core (benchmarks/RESULTS.md,
"Augmentation on the device").
The pixel operations run before the geometric ones (RandAugment draws their order at random; a
fixed order changes little and lets the warps run together). Nothing here synchronises the
host with the device.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from itertools import product
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from components.common.presets import TrainConfig

# Strengths are drawn uniformly in [-1, 1] and scaled: at most these. Geometric ops are drawn as
# the inverse maps the warp needs (output -> input coordinates, the image spanning [-1, 1]);
# their ranges are symmetric, so the inverse of a drawn map is drawn alike.
ROTATE_DEGREES, SHEAR_DEGREES, TRANSLATE_FRACTION = 20.0, 15.0, 0.15
ENHANCE_STRENGTH = 0.4  # brightness, colour, contrast, sharpness: factors 0.6 to 1.4
POSTERIZE_BITS = (4, 5, 6)
SOLARIZE_THRESHOLD = 128
CROP_TRIES = 10  # as torchvision: a crop that does not fit is drawn again, then the whole image

GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PIXEL_OPS = ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
RAND_AUGMENT_OPS = ("identity", *GEOMETRIC_OPS, *PIXEL_OPS)  # torchvision's RandAugment list


class ImageDraws(NamedTuple):
    """What happens to each of n images in one epoch, row i for image i."""

    ops: np.ndarray  # int64 (n, N): indices into RAND_AUGMENT_OPS, N = rand_augment, in order
    strength: np.ndarray  # float32 (n, N): of each operation, in [-1, 1]
    geometry: np.ndarray  # float32 (n, 2, 3): crop, flip, geometric operations as one map
    box: np.ndarray | None  # float32 (n, 4): erased (top, left, height, width) or zeros; None: no erasing


class Draws(NamedTuple):
    """What happens to a batch of B images; the tensors travel to the device, ``group_sizes``
    stays on the host so that splitting ``groups`` by it needs no synchronisation."""

    index: torch.Tensor  # int64 (B,): the images, rows of the split
    strength: torch.Tensor  # float32 (B, N): of each image's N RandAugment operations, in [-1, 1]
    geometry: torch.Tensor  # float32 (B, 2, 3): crop, flip, geometric operations as one map
    box: torch.Tensor | None  # float32 (B, 4): erased (top, left, height, width) or zeros; None: no erasing
    groups: torch.Tensor  # int64: batch positions grouped by (operation slot, pixel operation)
    group_sizes: tuple[int, ...]  # N x len(PIXEL_OPS) sizes of those groups


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The one seed of everything random in an epoch: its order and augmentation (drawn from
    (seed, epoch) alone, the same for every rank of a data-parallel job) and a rank's dropout
    and mixing (``rank`` 0's, or a single process's, from the same seed). A resumed run draws
    exactly what an uninterrupted one would."""
    return seed * 10_007 + epoch + rank * 1_000_003


def epoch_batches(
    size: int, config: TrainConfig, epoch: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> list[Draws]:
    """The draws of each full batch of ``epoch`` over a split of ``size`` images, on ``device``:
    every image once, in an order seeded by (seed, epoch), the last partial batch left out; of
    each batch, the ``rank``-th of ``world_size`` equal shares (the whole batch for one process)."""
    drawn = draw(size, config, epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch))).numpy()
    steps = len_epoch(size, config.batch_size)
    batches = np.array_split(order[: steps * config.batch_size], steps)
    return on_device([batch_draws(drawn, np.array_split(rows, world_size)[rank]) for rows in batches], device)


def endless_batches(size: int, config: TrainConfig, device: torch.device) -> Iterator[Draws]:
    """`epoch_batches` of epoch 0, 1, 2, ...: for a fixed number of steps."""
    return (batch for epoch in itertools.count() for batch in epoch_batches(size, config, epoch, device))


def len_epoch(size: int, batch_size: int) -> int:
    """Steps in an epoch: full batches only (one smaller batch if the split is smaller than one)."""
    return max(1, size // batch_size)


def draw(size: int, config: TrainConfig, epoch: int) -> ImageDraws:
    """The draws of all ``size`` images for ``epoch``, from (seed, epoch) alone."""
    rng = np.random.default_rng(epoch_seed(config.seed, epoch))
    ops = np.argsort(rng.random((size, len(RAND_AUGMENT_OPS))), axis=1)[:, : config.rand_augment]  # no repeats
    strength = rng.uniform(-1.0, 1.0, ops.shape).astype(np.float32)
    geometry = random_geometry(rng, config, ops, strength)
    box = random_erasing_boxes(rng, size, config.random_erasing) if config.random_erasing > 0 else None
    return ImageDraws(ops, strength, geometry, box)


def batch_draws(drawn: ImageDraws, index: np.ndarray) -> Draws:
    """The `Draws` of the images ``index`` (B,), on the host."""
    ops = drawn.ops[index]
    pixel_op_ids = [RAND_AUGMENT_OPS.index(op) for op in PIXEL_OPS]
    groups = [np.flatnonzero(ops[:, slot] == op) for slot, op in product(range(ops.shape[1]), pixel_op_ids)]
    return Draws(
        torch.from_numpy(np.asarray(index, dtype=np.int64)),
        torch.from_numpy(drawn.strength[index]),
        torch.from_numpy(drawn.geometry[index]),
        None if drawn.box is None else torch.from_numpy(drawn.box[index]),
        torch.from_numpy(np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)),
        tuple(len(group) for group in groups),
    )


def on_device(batches: list[Draws], device: torch.device) -> list[Draws]:
    """``batches`` with their tensors on ``device``: one copy per field for all of them (from
    pinned memory on a GPU, so that it does not make the host wait), each batch's tensors views
    of it."""
    fields = []
    for parts in zip(*(batch[:-1] for batch in batches)):  # index, strength, geometry, box, groups
        if parts[0] is None:
            fields.append(parts)
            continue
        whole = torch.cat(parts)
        if device.type == "cuda":
            whole = whole.pin_memory()
        fields.append(whole.to(device, non_blocking=True).split([len(part) for part in parts]))
    return [Draws(*tensors, batch.group_sizes) for *tensors, batch in zip(*fields, batches)]


def random_geometry(rng: np.random.Generator, config: TrainConfig, ops: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """The maps (n, 2, 3) from output to input coordinates (``F.affine_grid``'s ``theta``) of a
    random-resized crop, then a flip, then each image's geometric operations ``ops`` (n, N) at
    their ``strength`` (n, N), in order."""
    size = len(ops)
    width = height = np.ones(size)
    if config.crop_scale < 1:
        area = rng.uniform(config.crop_scale, 1.0, (size, CROP_TRIES))
        aspect = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (size, CROP_TRIES)))
        fits = (area * aspect <= 1) & (area / aspect <= 1)
        area, aspect = (np.take_along_axis(a, fits.argmax(1)[:, None], 1)[:, 0] for a in (area, aspect))
        width = np.where(fits.any(1), np.sqrt(area * aspect), 1.0)
        height = np.where(fits.any(1), np.sqrt(area / aspect), 1.0)
    theta = np.zeros((size, 3, 3))
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 2, 2] = width, height, 1.0
    theta[:, :2, 2] = rng.uniform(-1.0, 1.0, (size, 2)) * (1.0 - np.stack([width, height], 1))
    if config.hflip:  # crop @ flip: the flip negates the crop's x column
        theta[:, :, 0] *= np.where(rng.random(size) < 0.5, -1.0, 1.0)[:, None]
    for slot in range(ops.shape[1]):
        theta = theta @ _geometric_maps(ops[:, slot], strength[:, slot])
    return theta[:, :2].astype(np.float32)


def _geometric_maps(ops: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """(n, 3, 3): each image's geometric operation at its strength; the identity for the others."""
    names = np.asarray(RAND_AUGMENT_OPS)[ops]
    maps = np.tile(np.eye(3), (len(ops), 1, 1))
    angle = np.radians(strength * ROTATE_DEGREES)
    rotate = names == "rotate"
    maps[rotate, 0, 0] = maps[rotate, 1, 1] = np.cos(angle[rotate])
    maps[rotate, 0, 1], maps[rotate, 1, 0] = -np.sin(angle[rotate]), np.sin(angle[rotate])
    shear, shift = np.tan(np.radians(strength * SHEAR_DEGREES)), 2 * strength * TRANSLATE_FRACTION
    for op, entry, value in (
        ("shear_x", (0, 1), shear),
        ("shear_y", (1, 0), shear),
        ("translate_x", (0, 2), shift),
        ("translate_y", (1, 2), shift),
    ):
        chosen = names == op
        maps[chosen, entry[0], entry[1]] = value[chosen]
    return maps


def random_erasing_boxes(rng: np.random.Generator, size: int, probability: float) -> np.ndarray:
    """(size, 4): (top, left, height, width) as fractions of the side, all zero where nothing is
    erased: 1/50 to 1/3 of the area, aspect ratio 0.3 to 3.3, as in DeiT."""
    erased = rng.random(size) < probability
    area = rng.uniform(0.02, 1 / 3, size)
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), size))
    height, width = np.minimum(1.0, np.sqrt(area * aspect)), np.minimum(1.0, np.sqrt(area / aspect))
    top, left = rng.uniform(0.0, 1.0 - height), rng.uniform(0.0, 1.0 - width)
    return np.where(erased[:, None], np.stack([top, left, height, width], 1), 0.0).astype(np.float32)


def augment(images: torch.Tensor, draws: Draws, compiled: bool = False, size: int | None = None) -> torch.Tensor:
    """uint8 images (N, S, S, 3) of the whole split and a batch's draws, both on the device ->
    float model input (B, 3, s, s) in [-1, 1] at s = ``size`` or S (the warp resamples). The
    pixel operations run in float16 on a GPU, where each of their passes is bound by memory
    traffic and 0-255 is exact in half precision; in float32 on a CPU, which is slow at half.
    Without them the warp reads the uint8 batch itself. ``compiled``: the warp and erasing
    through torch.compile, which fuses their dozen passes over the batch, the conversion from
    uint8 included, into a few kernels (eager, they are a visible share of a step with CUDA
    graphs: benchmarks/RESULTS.md, "Augmentation on the device"); the pixel operations stay
    eager, their group sizes change every batch."""
    batch = images.index_select(0, draws.index).permute(0, 3, 1, 2)
    if draws.group_sizes:  # RandAugment is on
        dtype = torch.float16 if images.device.type == "cuda" else torch.float32
        batch = rand_augment_pixels(batch.to(dtype, memory_format=torch.contiguous_format), draws)
    transform = _compiled_warp() if compiled else warp
    return transform(batch, draws.geometry, draws.box, size or batch.shape[-1])


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
    """Images (B, 3, S, S) in [0, 255], uint8 or float, warps (B, 2, 3) and erased boxes (B, 4)
    or None -> model input (B, 3, size, size) in [-1, 1] (outside the image: black); erased
    boxes hold random pixels."""
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
    matrix product with an inner size of 3 ran as a slow fp32 GEMM (benchmarks/RESULTS.md,
    "Sampling grid written out")."""
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
