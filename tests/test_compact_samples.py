"""Compact samples (issue 23): workers hand over uint8 images and masks; the training step and the evaluation
loop convert and normalise them on the device, with the numbers of the former float path."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from conftest import compose_config, tiny_overrides
from segtrain.data.loading import build_dataset, train_loader
from segtrain.data.normalization import normalization, normalize_images
from segtrain.data.transforms import mask_dtype
from segtrain.engine.distributed import DistContext
from segtrain.engine.runtime import Runtime
from segtrain.engine.step import build_train_step
from segtrain.models import build_model


def test_mask_type_fits_the_labels():
    assert mask_dtype(19, 255) == torch.uint8 and mask_dtype(255, 255) == torch.uint8
    assert mask_dtype(300, 255) == torch.int16 and mask_dtype(150, 65535) == torch.int64


def test_normalize_images_matches_albumentations_and_keeps_the_layout():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    expected = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)(image=image)["image"].transpose(2, 0, 1)
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    torch.testing.assert_close(normalize_images(chw, mean, std), torch.from_numpy(expected), atol=1e-5, rtol=0)
    batch = normalize_images(chw[None].repeat(2, 1, 1, 1), mean, std, torch.channels_last)
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    floats = torch.randn(1, 3, 4, 4)
    assert normalize_images(floats, mean, std) is floats  # normalised already: used as it is


@pytest.mark.slow
def test_a_worker_hands_over_uint8_and_the_step_matches_the_float_path(tmp_path, shapes_root):
    cfg = compose_config("train", tiny_overrides(shapes_root, **{"model.dropout": 0.0}))
    mean, std = normalization(cfg)
    dataset = build_dataset(cfg.dataset, "train", train=True, normalize=(mean, std))
    loader = train_loader(dataset, 4, num_workers=1, seed=0, start_sample=0, pin_memory=False)
    batch = next(iter(loader))
    images, masks = batch["image"], batch["mask"]
    assert images.dtype == torch.uint8 and masks.dtype == torch.uint8 and images.shape[1] == 3
    # The former float path: albumentations' Normalize in the worker, an int64 mask.
    normalise = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)
    floats = torch.stack([torch.from_numpy(normalise(image=i.permute(1, 2, 0).numpy())["image"].transpose(2, 0, 1))
                          for i in images])
    cpu = torch.device("cpu")
    losses = []
    for batches in ([(images, masks)], [(floats, masks.long())]):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
        step = build_train_step(cfg, model, DistContext(0, 1, 0, cpu), Runtime(cpu, "off", channels_last=True), 5)
        losses.append(step(1, batches).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
