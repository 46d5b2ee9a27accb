"""augment: the draws are a function of (seed, epoch, image); the pixel operations are
torchvision's, per image; the warp is the one OpenCV computes for the same map; crops stay
inside the image; erased boxes are random pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from components.augment import (
    ENHANCE_STRENGTH,
    PIXEL_OP_FUNCTIONS,
    PIXEL_OPS,
    POSTERIZE_BITS,
    RAND_AUGMENT_OPS,
    SOLARIZE_THRESHOLD,
    RandomDraws,
    augment,
    mix,
    rand_augment_pixels,
    sampling_grid,
    warp,
)
from components.data import to_input
from components.presets import preset

IMAGES = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))


def random_draws(**settings) -> RandomDraws:
    return RandomDraws(len(IMAGES), preset("smoke", **settings))


def batch(draws: RandomDraws, epoch: int = 0, indices: list[int] | None = None):
    return draws.collate([draws[(epoch, i)] for i in (range(len(IMAGES)) if indices is None else indices)])


def test_draws_are_a_function_of_seed_epoch_and_image():
    draws = random_draws(rand_augment=2, random_erasing=0.5)
    index, ops, strength, geometry, box = draws[(3, 1)]
    assert index == 1 and ops.shape == strength.shape == (2,) and geometry.shape == (2, 3) and box.shape == (4,)
    again = random_draws(rand_augment=2, random_erasing=0.5)[(3, 1)]  # a fresh copy, as in another process
    assert all(np.array_equal(a, b) for a, b in zip(draws[(3, 1)], again))
    assert not np.array_equal(draws[(4, 1)][3], geometry)  # another epoch: another view
    assert not np.array_equal(random_draws(rand_augment=2, random_erasing=0.5, seed=1)[(3, 1)][3], geometry)


def test_without_augmentation_the_input_is_the_image():
    draws = random_draws(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.0)
    order = [5, 2, 7, 0]
    drawn = batch(draws, indices=order)
    assert drawn.box is None and drawn.group_sizes == ()  # nothing to erase, no operations to run
    assert torch.allclose(augment(IMAGES, drawn), to_input(IMAGES[order]), atol=1e-5)


@pytest.mark.parametrize("size", [16, 24])
def test_a_warp_to_a_smaller_size_resamples_the_whole_image(size):
    # Training at several sizes (the images are kept at the largest): without crop or flip the
    # input is the image bilinearly resized.
    drawn = batch(random_draws(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.0))
    resized = torch.nn.functional.interpolate(to_input(IMAGES), size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(augment(IMAGES, drawn, size=size), resized, atol=1e-5, rtol=0)


def test_each_batch_position_is_in_the_group_of_each_pixel_operation_it_drew():
    draws = random_draws(rand_augment=3)
    drawn = batch(draws, epoch=2)
    groups = drawn.groups.split(drawn.group_sizes)
    slots_and_ops = [(slot, op) for slot in range(3) for op in PIXEL_OPS]
    for position in range(len(IMAGES)):
        drawn_ops = [RAND_AUGMENT_OPS[op] for op in draws[(2, position)][1]]
        for (slot, op), group in zip(slots_and_ops, groups, strict=True):
            assert (position in group.tolist()) == (drawn_ops[slot] == op)


def torchvision_reference(op: str, image: torch.Tensor, strength: float) -> torch.Tensor:
    factor = 1 + ENHANCE_STRENGTH * strength
    bits = POSTERIZE_BITS[min(int((strength + 1) * len(POSTERIZE_BITS) / 2), len(POSTERIZE_BITS) - 1)]
    return {
        "brightness": lambda: TF.adjust_brightness(image, factor),
        "color": lambda: TF.adjust_saturation(image, factor),
        "contrast": lambda: TF.adjust_contrast(image, factor),
        "sharpness": lambda: TF.adjust_sharpness(image, factor),
        "posterize": lambda: TF.posterize(image, bits),
        "solarize": lambda: TF.solarize(image, SOLARIZE_THRESHOLD),
        "autocontrast": lambda: TF.autocontrast(image),
        "equalize": lambda: TF.equalize(image),
    }[op]()


@pytest.mark.parametrize("op", PIXEL_OPS)
def test_pixel_operations_are_torchvisions_with_a_strength_per_image(op):
    # torchvision's functions, one uint8 image and one factor a call, are the independent
    # reference; they truncate to integers where ours stay exact.
    images = IMAGES.permute(0, 3, 1, 2).contiguous()
    images[0, 1] = 77  # a constant channel: autocontrast and equalize leave it
    strength = torch.linspace(-1, 1, len(images))
    ours = PIXEL_OP_FUNCTIONS[op](images.float(), strength)
    assert ours.shape == images.shape and 0 <= ours.min() and ours.max() <= 255
    for image, value, result in zip(images, strength.tolist(), ours):
        reference = torchvision_reference(op, image, value)
        assert (result - reference.float()).abs().max() < 1.001


def test_pixel_operations_run_in_each_images_drawn_order():
    draws = random_draws(rand_augment=3)
    for epoch in range(3):
        drawn = batch(draws, epoch)
        ours = rand_augment_pixels(IMAGES.permute(0, 3, 1, 2).float(), drawn)
        for position in range(len(IMAGES)):
            _, ops, strength, _, _ = draws[(epoch, position)]
            expected = IMAGES[position].permute(2, 0, 1)[None].float()
            for op, value in zip(ops, strength):
                if RAND_AUGMENT_OPS[op] in PIXEL_OPS:
                    expected = PIXEL_OP_FUNCTIONS[RAND_AUGMENT_OPS[op]](expected, torch.tensor([value]))
            assert torch.equal(ours[position], expected[0])


@pytest.mark.parametrize("op", PIXEL_OPS)
def test_pixel_operations_in_half_precision_as_on_a_gpu_stay_within_a_few_grey_levels(op):
    smooth = torch.nn.functional.interpolate(IMAGES.permute(0, 3, 1, 2)[:, :, :8, :8].float(), 224, mode="bicubic")
    pixels, strength = smooth.clamp(0, 255).round(), torch.linspace(-1, 1, len(IMAGES))
    half = PIXEL_OP_FUNCTIONS[op](pixels.half(), strength)
    assert half.dtype == torch.float16
    difference = (PIXEL_OP_FUNCTIONS[op](pixels, strength) - half.float()).abs()
    assert difference.mean() < 0.1 and difference.max() <= 3  # rounding at .5 boundaries, rarely


def test_the_sampling_grid_is_affine_grids():
    geometry = batch(random_draws(crop_scale=0.35, rand_augment=2)).geometry
    expected = torch.nn.functional.affine_grid(geometry, [len(geometry), 3, 24, 24], align_corners=False)
    assert torch.allclose(sampling_grid(geometry, 24), expected, atol=1e-6)


@pytest.mark.parametrize("epoch", range(4))
def test_the_device_warp_equals_opencvs_for_the_same_map(epoch):
    # OpenCV is the independent reference: the map, turned from [-1, 1] coordinates into
    # pixels, warps each image alike (up to OpenCV's 5-bit interpolation weights).
    drawn = batch(random_draws(crop_scale=0.35, rand_augment=2), epoch)
    side = IMAGES.shape[1]
    warped = ((warp(IMAGES.permute(0, 3, 1, 2).float(), drawn.geometry, None, side) + 1) * 127.5).permute(0, 2, 3, 1)
    warped = warped.numpy()
    to_normalised = np.array([[2 / side, 0, 1 / side - 1], [0, 2 / side, 1 / side - 1], [0, 0, 1]])
    for image, geometry, ours in zip(IMAGES.numpy(), drawn.geometry.numpy(), warped):
        to_pixels = np.linalg.inv(to_normalised) @ np.vstack([geometry, [0, 0, 1]]) @ to_normalised
        reference = cv2.warpAffine(
            image.astype(np.float32),
            to_pixels[:2],
            (side, side),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        inside = np.pad(np.ones((side - 2, side - 2), bool), 1)  # the outermost pixels blend the border alike
        assert np.abs(ours - reference)[inside].max() < 1.0


def test_crops_stay_inside_the_image_and_half_are_flipped():
    draws = random_draws(crop_scale=0.2, rand_augment=0)
    geometry = np.stack([draws[(epoch, i)][3] for epoch in range(50) for i in range(len(IMAGES))])
    corners = np.array([[-1, -1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, 1]], dtype=np.float32).T
    assert np.all(np.abs(geometry @ corners) <= 1 + 1e-6)
    scale = np.abs(geometry[:, 0, 0] * geometry[:, 1, 1])  # the crop's area fraction
    assert scale.min() >= 0.2 - 1e-6 and scale.max() <= 1 + 1e-6 and scale.std() > 0.1
    assert 0.4 < np.mean(geometry[:, 0, 0] < 0) < 0.6


def test_erased_boxes_are_random_pixels_and_the_rest_is_untouched():
    draws = random_draws(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.5)
    indices = [i for _ in range(25) for i in range(len(IMAGES))]
    drawn = draws.collate([draws[(epoch, i)] for epoch in range(25) for i in range(len(IMAGES))])
    boxes = drawn.box.numpy()
    erased = boxes[:, 2] > 0
    assert 0.35 < erased.mean() < 0.65
    area = boxes[erased, 2] * boxes[erased, 3]
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 1 / 3 + 1e-6
    torch.manual_seed(0)
    inputs = augment(IMAGES, drawn)
    changed = (inputs - to_input(IMAGES[indices])).abs().amax(1) > 1e-4  # (N, S, S)
    side = IMAGES.shape[1]
    for index in np.flatnonzero(erased)[:20]:
        top, left, height, width = (np.round(boxes[index] * side)).astype(int)
        assert changed[index, top + 1 : top + height - 1, left + 1 : left + width - 1].all()
        assert changed[index].sum() <= (height + 1) * (width + 1)
    assert not changed[torch.from_numpy(~erased)].any()


def test_the_compiled_warp_computes_what_the_eager_one_does():
    draws = random_draws(rand_augment=2, random_erasing=0.5)
    drawn = draws.collate([draws[(epoch, i)] for epoch in range(4) for i in range(len(IMAGES))])
    eager, compiled = augment(IMAGES, drawn), augment(IMAGES, drawn, compiled=True)
    erased = (drawn.box[:, 2] > 0).numpy()  # their boxes hold random pixels, from another generator
    assert 0 < erased.sum() < len(erased)
    torch.testing.assert_close(compiled[~erased], eager[~erased], atol=1e-4, rtol=0)
    outside = (compiled - eager).abs().amax(1) < 1e-4  # erased images agree outside their box
    assert outside[erased].float().mean() > 0.6


def test_mixed_targets_stay_distributions_weighted_by_what_was_mixed():
    torch.manual_seed(0)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 8, 8).contiguous()
    targets = torch.eye(4)
    for settings in ({"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}):
        mixed, soft = mix(images, targets, preset("smoke", **settings))
        assert torch.allclose(soft.sum(1), torch.ones(4))
        share_of_own_image = soft[torch.arange(4), torch.arange(4)]  # image i is mixed with image 3 - i
        expected = (mixed - images.flip(0)) / (images - images.flip(0))
        assert torch.allclose(expected.mean((1, 2, 3)), share_of_own_image, atol=1e-5)
