import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config, tiny_overrides
from segtrain.config import AugmentConfig
from segtrain.data.dataset import read_mask
from segtrain.data.loading import TrainStream, build_dataset, sample_seed
from segtrain.data.normalization import normalization, normalize_images
from segtrain.data.shapes import CLASS_NAMES, shapes_samples
from segtrain.data.transforms import train_transform
from segtrain.errors import DataError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_shapes_are_generated_once_and_deterministically(tmp_path):
    a = shapes_samples(tmp_path / "a", "train", num_train=6, num_val=2, image_size=[40, 48], seed=3)
    b = shapes_samples(tmp_path / "b", "train", num_train=6, num_val=2, image_size=[40, 48], seed=3)
    assert len(a) == 6
    for (ia, ma), (ib, mb) in zip(a, b):
        assert ia.read_bytes() == ib.read_bytes() and ma.read_bytes() == mb.read_bytes()
    stamp = a[0][0].stat().st_mtime_ns
    shapes_samples(tmp_path / "a", "val", num_train=6, num_val=2, image_size=[40, 48], seed=3)
    assert a[0][0].stat().st_mtime_ns == stamp  # read back, not regenerated


def test_shapes_masks_are_palette_pngs_with_ignore_borders(tmp_path):
    samples = shapes_samples(tmp_path / "s", "train", num_train=8, num_val=2, image_size=[64, 64], seed=0)
    values = set()
    for _, mask_path in samples:
        with Image.open(mask_path) as img:
            assert img.mode == "P"
        values |= set(np.unique(read_mask(mask_path)).tolist())
    assert 255 in values and 0 in values
    assert values <= set(range(len(CLASS_NAMES))) | {255}
    assert len(values - {0, 255}) >= 2


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a generated shapes dataset"):
        shapes_samples(tmp_path / "mine", "train", num_train=2, num_val=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_padded_crop_regions_are_ignore_in_the_mask():
    transform = train_transform(AugmentConfig(crop_size=[64, 64], scale_range=[1.0, 1.0], hflip=False), MEAN, STD)
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.ones((20, 30), np.uint8)
    img_t, mask_t = transform(image, mask, seed=0)
    assert img_t.shape == (3, 64, 64) and mask_t.shape == (64, 64)
    assert (mask_t == 1).sum() == 20 * 30
    assert (mask_t == 255).sum() == 64 * 64 - 20 * 30
    # The image is padded with the mean colour: zero after normalisation (on the device).
    assert img_t.dtype == torch.uint8 and mask_t.dtype == torch.uint8
    assert torch.allclose(normalize_images(img_t, MEAN, STD)[:, 30:, 40:], torch.zeros(()), atol=1e-2)


def test_augmentation_depends_only_on_the_seed():
    transform = train_transform(AugmentConfig(crop_size=[24, 24]), MEAN, STD)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (40, 50), dtype=np.uint8)
    a, b, c = transform(image, mask, 7), transform(image, mask, 7), transform(image, mask, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_validation_samples_keep_their_original_size(shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    for index in range(len(dataset)):
        image_path, _ = dataset.samples[index]
        with Image.open(image_path) as img:
            width, height = img.size
        sample = dataset[index]
        assert sample["image"].shape == (3, height, width)
        assert sample["mask"].shape == (height, width)


def test_train_stream_is_a_pure_function_of_position():
    full = TrainStream(10, seed=5)
    items = [x for _, x in zip(range(35), full)]
    resumed = TrainStream(10, seed=5, start=17)
    assert [x for _, x in zip(range(18), resumed)] == items[17:]
    # every epoch is a permutation of the dataset
    for epoch in range(3):
        assert sorted(i for i, _ in items[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert items[3][1] == sample_seed(5, 3)


def test_two_ranks_split_the_single_process_stream():
    single = [x for _, x in zip(range(12), TrainStream(7, seed=1))]
    rank0 = [x for _, x in zip(range(6), TrainStream(7, seed=1, rank=0, world_size=2))]
    rank1 = [x for _, x in zip(range(6), TrainStream(7, seed=1, rank=1, world_size=2))]
    assert rank0 == single[0::2] and rank1 == single[1::2]


def test_invalid_label_value_names_the_file(tmp_path, shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root))
    dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
    image_path, mask_path = dataset.samples[0]
    bad = tmp_path / "bad.png"
    mask = read_mask(mask_path).copy()
    mask[0, 0] = 37
    Image.fromarray(mask, mode="L").save(bad)
    dataset.samples[0] = (image_path, bad)
    with pytest.raises(DataError, match=r"bad\.png.*\[37\]"):
        dataset[0]


def test_empty_and_trailing_data_images(tmp_path):
    import cv2

    from segtrain.data.dataset import decode_image

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        decode_image(tmp_path / "empty.jpg")
    ok, encoded = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))
    (tmp_path / "motion.jpg").write_bytes(encoded.tobytes() + b"\x00" * 500)  # data after the image
    assert decode_image(tmp_path / "motion.jpg")[0].shape == (8, 8, 3)
    (tmp_path / "cut.jpg").write_bytes(encoded.tobytes()[:-40])
    with pytest.raises(DataError, match="truncated"):
        decode_image(tmp_path / "cut.jpg")
