"""augment: the loader's part is a function of (seed, epoch, image); the device's warp is the
one OpenCV computes for the same map; crops stay inside the image; erased boxes are random pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from components.augment import AugmentedImages, augment_on_device, mix
from components.data import to_input
from components.presets import preset

IMAGES = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)


def augmented(**settings) -> AugmentedImages:
    return AugmentedImages(IMAGES, np.arange(len(IMAGES)), preset("smoke", **settings))


def on_device(items: list) -> torch.Tensor:
    images, _, geometry, boxes = (torch.as_tensor(np.stack(part)) for part in zip(*items))
    return augment_on_device(images, geometry, boxes)


def test_augmentation_is_a_function_of_seed_epoch_and_image():
    views = augmented(rand_augment=2, random_erasing=0.5)
    image, label, geometry, box = views[(3, 1)]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 1
    assert geometry.shape == (2, 3) and box.shape == (4,)
    again = augmented(rand_augment=2, random_erasing=0.5)[(3, 1)]  # a fresh copy, as in another process
    assert all(np.array_equal(a, b) for a, b in zip(views[(3, 1)], again))
    assert not np.array_equal(views[(4, 1)][2], geometry)  # another epoch: another view
    assert not np.array_equal(augmented(rand_augment=2, random_erasing=0.5, seed=1)[(3, 1)][2], geometry)


def test_without_augmentation_the_input_is_the_image():
    views = augmented(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.0)
    items = [views[(0, i)] for i in range(len(IMAGES))]
    assert all(np.array_equal(image, original) for (image, *_), original in zip(items, IMAGES))
    assert torch.allclose(on_device(items), to_input(torch.from_numpy(IMAGES)), atol=1e-5)
    images, _, geometry, _ = (torch.as_tensor(np.stack(part)) for part in zip(*items))
    assert torch.equal(augment_on_device(images, geometry, None), on_device(items))  # None: no erasing at all


@pytest.mark.parametrize("epoch", range(4))
def test_the_device_warp_equals_opencvs_for_the_same_map(epoch):
    # OpenCV is the independent reference: the map, turned from [-1, 1] coordinates into
    # pixels, warps each image alike (up to OpenCV's 5-bit interpolation weights).
    views = augmented(crop_scale=0.35, rand_augment=2, random_erasing=0.0)
    items = [views[(epoch, i)] for i in range(len(IMAGES))]
    warped = ((on_device(items) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    side = IMAGES.shape[1]
    to_normalised = np.array([[2 / side, 0, 1 / side - 1], [0, 2 / side, 1 / side - 1], [0, 0, 1]])
    for (image, _, geometry, _), ours in zip(items, warped):
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
    views = augmented(crop_scale=0.2, rand_augment=0)
    geometry = np.stack([views[(epoch, i)][2] for epoch in range(50) for i in range(len(IMAGES))])
    corners = np.array([[-1, -1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, 1]], dtype=np.float32).T
    assert np.all(np.abs(geometry @ corners) <= 1 + 1e-6)
    scale = np.abs(geometry[:, 0, 0] * geometry[:, 1, 1])  # the crop's area fraction
    assert scale.min() >= 0.2 - 1e-6 and scale.max() <= 1 + 1e-6 and scale.std() > 0.1
    assert 0.4 < np.mean(geometry[:, 0, 0] < 0) < 0.6


def test_erased_boxes_are_random_pixels_and_the_rest_is_untouched():
    views = augmented(crop_scale=1.0, hflip=False, rand_augment=0, random_erasing=0.5)
    items = [views[(epoch, i)] for epoch in range(25) for i in range(len(IMAGES))]
    boxes = np.stack([box for *_, box in items])
    erased = boxes[:, 2] > 0
    assert 0.35 < erased.mean() < 0.65
    area = boxes[erased, 2] * boxes[erased, 3]
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 1 / 3 + 1e-6
    torch.manual_seed(0)
    inputs = on_device(items)
    clean = to_input(torch.from_numpy(np.stack([image for image, *_ in items])))
    changed = (inputs - clean).abs().amax(1) > 1e-4  # (N, S, S)
    side = IMAGES.shape[1]
    for index in np.flatnonzero(erased)[:20]:
        top, left, height, width = (np.round(boxes[index] * side)).astype(int)
        assert changed[index, top + 1 : top + height - 1, left + 1 : left + width - 1].all()
        assert changed[index].sum() <= (height + 1) * (width + 1)
    assert not changed[torch.from_numpy(~erased)].any()


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


def test_opencv_runs_single_threaded_so_forked_loader_processes_cannot_deadlock():
    # On the GPU machine, loader processes forked after OpenCV had started its thread pool hung
    # before the first batch; importing the trainer must leave OpenCV single-threaded.
    import components.train  # noqa: F401

    assert cv2.getNumThreads() == 1
