"""The recipes' augmentations: rotation, Gaussian blur, DLA's jitter and DeepLab's discrete scales."""

import cv2
import numpy as np
import pytest

from conftest import compose_config
from segtrain.config import AugmentConfig
from segtrain.data.transforms import DiscreteRandomScale, discrete_scales, train_transform
from segtrain.errors import ConfigError

MEAN = [0.2, 0.4, 0.6]
UNIT = [1.0, 1.0, 1.0]


def _blocks(size: int = 96, block: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Classes 0-3 in a checkerboard of blocks; every pixel's grey level is 60 x its class."""
    ys, xs = np.mgrid[:size, :size]
    mask = (((ys // block) + 2 * (xs // block)) % 4).astype(np.uint8)
    image = np.repeat((mask * 60)[..., None], 3, axis=2).astype(np.uint8)
    return image, mask


def _only(augment: dict, size: int = 96) -> AugmentConfig:
    return AugmentConfig(crop_size=[size, size], scale_range=[1.0, 1.0], hflip=False, **augment)


def test_rotation_keeps_image_and_mask_aligned_and_pads_the_mask_with_ignore():
    image, mask = _blocks()
    transform = train_transform(_only({"rotate": 30.0}), MEAN, UNIT)
    rotated_some = False
    for seed in range(6):
        out, out_mask = transform(image, mask, seed)
        out_mask = out_mask.numpy()
        grey = out[0].numpy() * 255.0 + 255.0 * MEAN[0]  # undo the normalisation of channel 0
        labelled = out_mask != 255
        # Away from block edges bilinear and nearest agree: the image grey level is 60 x the mask class.
        agree = np.abs(grey - 60.0 * out_mask) < 1.0
        assert agree[labelled].mean() > 0.9
        uncovered = ~labelled
        if uncovered.any():
            rotated_some = True
            # Uncovered pixels: 255 in the mask and the image pad value (the mean: 0 after normalising),
            # away from the one-pixel seam where bilinear blends image and fill.
            inside = cv2.erode(uncovered.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            assert inside.any() and np.abs(out.numpy()[:, inside]).max() < 1e-5
            assert {out_mask[0, 0], out_mask[0, -1], out_mask[-1, 0], out_mask[-1, -1]} <= {255}
    assert rotated_some
    with pytest.raises(ConfigError, match="dataset.augment.rotate"):
        train_transform(_only({"rotate": 200.0}), MEAN, UNIT)
    with pytest.raises(ConfigError, match="dataset.augment.rotate_prob"):
        train_transform(_only({"rotate": 10.0, "rotate_prob": 1.5}), MEAN, UNIT)


def test_rotation_is_seeded_and_rotate_prob_zero_leaves_the_sample_alone():
    image, mask = _blocks()
    transform = train_transform(_only({"rotate": 10.0}), MEAN, UNIT)
    first, again = transform(image, mask, 7), transform(image, mask, 7)
    assert (first[0] == again[0]).all() and (first[1] == again[1]).all()
    untouched = train_transform(_only({"rotate": 10.0, "rotate_prob": 0.0}), MEAN, UNIT)(image, mask, 7)
    assert (untouched[1].numpy() == mask).all()


def test_gaussian_blur_is_semsegs_5x5_kernel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    transform = train_transform(_only({"gaussian_blur": 1.0}, 40), [0.0] * 3, UNIT)
    out, out_mask = transform(image[:, :40], mask[:, :40], 0)
    expected = cv2.GaussianBlur(image[:, :40], (5, 5), 0).astype(np.float32)
    assert np.abs(out.numpy().transpose(1, 2, 0) * 255.0 - expected).max() < 1e-3
    assert (out_mask.numpy() == 0).all()
    with pytest.raises(ConfigError, match="dataset.augment.gaussian_blur"):
        train_transform(_only({"gaussian_blur": 2.0}), MEAN, UNIT)


def test_enhance_jitter_changes_the_image_only_and_is_seeded():
    image, mask = _blocks(48, 12)
    transform = train_transform(_only({"enhance_jitter": 0.4}, 48), [0.0] * 3, UNIT)
    out, out_mask = transform(image, mask, 3)
    assert (transform(image, mask, 3)[0] == out).all()
    assert not np.allclose(out.numpy().transpose(1, 2, 0) * 255.0, image, atol=1.0)
    assert (out_mask.numpy() == mask).all()
    with pytest.raises(ConfigError, match="dataset.augment.enhance_jitter"):
        train_transform(_only({"enhance_jitter": 1.0}), MEAN, UNIT)


def test_discrete_scales_are_deeplabs_steps():
    assert discrete_scales(0.5, 2.0, 0.25) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    step = DiscreteRandomScale(discrete_scales(0.5, 2.0, 0.25), p=1.0)
    chosen = set()
    for seed in range(60):
        step.set_random_seed(seed)
        chosen.add(step.get_params()["scale"])
    assert chosen == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}
    with pytest.raises(ConfigError, match="scale_step"):
        train_transform(AugmentConfig(scale_step=0.0), MEAN, UNIT)


@pytest.mark.parametrize("experiment, expected", [
    ("pspnet_r101_voc", {"rotate": 10, "rotate_prob": 0.5, "gaussian_blur": 0.5}),
    ("pspnet_r101_cityscapes", {"rotate": 10, "rotate_prob": 0.5, "gaussian_blur": 0.5}),
    ("drn_d_105_cityscapes", {"rotate": 10, "rotate_prob": 1.0, "gaussian_blur": 0.0}),
    ("dla34_up_cityscapes", {"rotate": 10, "enhance_jitter": 0.4, "color_jitter": 0.0}),
    ("deeplabv3plus_xception65_voc", {"scale_step": 0.25, "rotate": 0.0}),
    ("deeplabv3plus_r101_voc", {"scale_step": 0.25, "rotate": 0.0}),
    ("hrnetv2_w48_cityscapes", {"scale_step": None, "rotate": 0.0, "gaussian_blur": 0.0}),
    ("pspnet_r101_ade20k", {"rotate": 10, "rotate_prob": 0.5, "gaussian_blur": 0.5}),
    ("deeplabv3plus_xception65_ade20k", {"scale_step": 0.25, "rotate": 0.0}),
    ("hrnetv2_w48_pascal_context59", {"scale_range": [0.5, 2.0], "rotate": 0.0, "gaussian_blur": 0.0}),
    ("hrnetv2_w48_lip", {"scale_range": [0.5, 1.5], "rotate": 0.0, "hflip": True}),
])
def test_each_experiment_sets_its_papers_augmentations(experiment, expected):
    augment = compose_config("train", [f"experiment={experiment}"]).dataset.augment
    assert {key: augment[key] for key in expected} == expected
