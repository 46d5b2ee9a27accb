"""augment: the draws are a function of (seed, epoch); the pixel operations are
torchvision's, per image; the warp is the one OpenCV computes for the same map; crops stay
inside the image; erased boxes are random pixels."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from components.common.augment import (
    ENHANCE_STRENGTH,
    PIXEL_OP_FUNCTIONS,
    PIXEL_OPS,
    POSTERIZE_BITS,
    RAND_AUGMENT_OPS,
    SOLARIZE_THRESHOLD,
    Draws,
    ImageDraws,
    augment,
    batch_draws,
    draw,
    epoch_batches,
    mix,
    on_device,
    rand_augment_pixels,
    sampling_grid,
    warp,
)
from components.common.images import to_input
from components.common.presets import preset

IMAGES = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))


def random_draws(epoch: int = 0, size: int = len(IMAGES), **settings) -> ImageDraws:
    return draw(size, preset("smoke", **settings), epoch)


def batch(drawn: ImageDraws, indices: list[int] | None = None) -> Draws:
    return batch_draws(drawn, np.arange(len(drawn.geometry)) if indices is None else np.array(indices))


def test_draws_are_a_function_of_seed_and_epoch():
    config = preset("smoke", rand_augment=2, random_erasing=0.5)
    drawn = draw(8, config, epoch=3)
    assert drawn.ops.shape == drawn.strength.shape == (8, 2) and drawn.geometry.shape == (8, 2, 3)
    assert drawn.box.shape == (8, 4)
    assert all(np.array_equal(a, b) for a, b in zip(drawn, draw(8, config, epoch=3)))  # as a resumed run draws
    assert not np.array_equal(draw(8, config, epoch=4).geometry, drawn.geometry)  # another epoch: another view
    assert not np.array_equal(draw(8, replace(config, seed=1), epoch=3).geometry, drawn.geometry)
    many = draw(500, config, epoch=0).ops
    assert all(len(set(ops)) == 2 for ops in many)  # two different operations an image
    assert np.bincount(many.ravel(), minlength=len(RAND_AUGMENT_OPS)).min() > 40  # each of the 14 drawn


def test_every_epoch_trains_each_image_once_in_full_batches_of_its_own_order():
    config = preset("smoke", batch_size=3, rand_augment=2, random_erasing=0.5)
    batches = epoch_batches(10, config, 1, torch.device("cpu"))
    index = torch.cat([batch.index for batch in batches])
    assert [len(batch.index) for batch in batches] == [3, 3, 3] and len(set(index.tolist())) == 9
    drawn = draw(10, config, 1)
    for batch in batches:  # an image's draws are its own, whatever batch it lands in
        assert torch.equal(batch.geometry, torch.from_numpy(drawn.geometry[batch.index]))
        assert torch.equal(batch.box, torch.from_numpy(drawn.box[batch.index]))
    again = epoch_batches(10, config, 1, torch.device("cpu"))  # a resumed epoch is the same epoch
    assert all(torch.equal(a.index, b.index) and torch.equal(a.strength, b.strength) for a, b in zip(batches, again))
    assert not torch.equal(
        torch.cat([batch.index for batch in epoch_batches(10, config, 2, torch.device("cpu"))]), index
    )


def test_the_copy_to_the_device_keeps_each_batchs_draws():
    # One copy per field for the whole epoch, split back into batches: on a CPU the same path.
    drawn = random_draws(size=8, rand_augment=2, random_erasing=0.5)
    batches = [batch(drawn, [5, 2, 7]), batch(drawn, [0, 1, 3]), batch(drawn, [4, 6, 2])]
    for ours, theirs in zip(on_device(batches, torch.device("cpu")), batches, strict=True):
        assert ours.group_sizes == theirs.group_sizes
        assert all(torch.equal(a, b) for a, b in zip(ours[:-1], theirs[:-1]))
    no_erasing = [batch(random_draws(random_erasing=0.0), [1, 2])]
    assert on_device(no_erasing, torch.device("cpu"))[0].box is None


def test_without_augmentation_the_input_is_the_image():
    order = [5, 2, 7, 0]
    drawn = batch(random_draws(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.0), order)
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
    draws = random_draws(epoch=2, rand_augment=3)
    drawn = batch(draws)
    groups = drawn.groups.split(drawn.group_sizes)
    slots_and_ops = [(slot, op) for slot in range(3) for op in PIXEL_OPS]
    for position in range(len(IMAGES)):
        drawn_ops = [RAND_AUGMENT_OPS[op] for op in draws.ops[position]]
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
    for epoch in range(3):
        draws = random_draws(epoch, rand_augment=3)
        ours = rand_augment_pixels(IMAGES.permute(0, 3, 1, 2).float(), batch(draws))
        for position in range(len(IMAGES)):
            ops, strength = draws.ops[position], draws.strength[position]
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
    drawn = batch(random_draws(epoch, crop_scale=0.35, rand_augment=2))
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
    geometry = random_draws(size=400, crop_scale=0.2, rand_augment=0).geometry
    corners = np.array([[-1, -1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, 1]], dtype=np.float32).T
    assert np.all(np.abs(geometry @ corners) <= 1 + 1e-6)
    scale = np.abs(geometry[:, 0, 0] * geometry[:, 1, 1])  # the crop's area fraction
    assert scale.min() >= 0.2 - 1e-6 and scale.max() <= 1 + 1e-6 and scale.std() > 0.1
    assert 0.4 < np.mean(geometry[:, 0, 0] < 0) < 0.6


def test_erased_boxes_are_random_pixels_and_the_rest_is_untouched():
    images = IMAGES.repeat(25, 1, 1, 1)
    drawn = batch(random_draws(size=len(images), crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.5))
    boxes = drawn.box.numpy()
    erased = boxes[:, 2] > 0
    assert 0.35 < erased.mean() < 0.65
    area = boxes[erased, 2] * boxes[erased, 3]
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 1 / 3 + 1e-6
    torch.manual_seed(0)
    inputs = augment(images, drawn)
    changed = (inputs - to_input(images)).abs().amax(1) > 1e-4  # (N, S, S)
    side = IMAGES.shape[1]
    for index in np.flatnonzero(erased)[:20]:
        top, left, height, width = (np.round(boxes[index] * side)).astype(int)
        assert changed[index, top + 1 : top + height - 1, left + 1 : left + width - 1].all()
        assert changed[index].sum() <= (height + 1) * (width + 1)
    assert not changed[torch.from_numpy(~erased)].any()


@pytest.mark.parametrize("rand_augment", [0, 2])  # without it the warp reads the uint8 images
def test_the_compiled_warp_computes_what_the_eager_one_does(rand_augment):
    images = IMAGES.repeat(4, 1, 1, 1)
    drawn = batch(random_draws(size=len(images), rand_augment=rand_augment, random_erasing=0.5))
    eager, compiled = augment(images, drawn), augment(images, drawn, compiled=True)
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
