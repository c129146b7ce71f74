"""The mean/std an image is normalised with: the dataset's if set, else the backbone's pretrained weights'.

Every command takes it from here, so training, validation, eval, predict and the TensorBoard images
normalise identically, through one function, `normalize_images`. Loader workers hand over uint8 images:
the float conversion and the normalisation run on the device, after the copy (a quarter of the bytes of
float32 through shared memory, pinned memory and PCIe). Precedence of the statistics, per statistic:
1. `dataset.mean` / `dataset.std` when not null (a user's explicit choice);
2. `backbone.mean` / `backbone.std`: the statistics the backbone's pretrained weights were trained with
   (conf/backbone/*.yaml carry them, e.g. 0.5 for Xception-65's TF weights); null or absent there means
   "what timm's pretrained_cfg declares for `backbone.name`" (conf/backbone/timm.yaml), which only a timm
   backbone can fill in.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from segtrain.errors import ConfigError

TIMM_TARGET = "segtrain.models.backbones.timm_encoder.TimmBackbone"


def _checked(key: str, values: Any, positive: bool) -> list[float]:
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be three numbers (R, G, B) in [0, 1] units, got {values!r}") from None
    if len(floats) != 3 or (positive and min(floats) <= 0):
        raise ConfigError(f"{key} must be three {'positive ' if positive else ''}numbers (R, G, B), got {values!r}")
    return floats


def timm_normalization(name: str) -> tuple[list[float], list[float]]:
    """mean/std that timm's pretrained_cfg declares for `name` (with or without a weights tag)."""
    import timm

    pretrained = timm.get_pretrained_cfg(str(name))
    if pretrained is None or getattr(pretrained, "mean", None) is None or getattr(pretrained, "std", None) is None:
        raise ConfigError(f"backbone.mean/std are null or unset and timm declares no mean/std for {name!r}: set "
                          "backbone.mean=[R,G,B] backbone.std=[R,G,B] (or dataset.mean/std)")
    return list(pretrained.mean), list(pretrained.std)


def backbone_normalization(backbone: Mapping | None) -> tuple[list[float], list[float]]:
    """The statistics the backbone's weights expect (rule 2 of the module docstring)."""
    backbone = backbone or {}
    mean, std = backbone.get("mean"), backbone.get("std")
    if mean is None or std is None:
        if backbone.get("_target_") != TIMM_TARGET:
            raise ConfigError("backbone.mean/std are null or unset, which only a timm backbone can fill in (from "
                              "timm's pretrained_cfg): set backbone.mean=[R,G,B] backbone.std=[R,G,B]")
        timm_mean, timm_std = timm_normalization(backbone.get("name"))
        mean = timm_mean if mean is None else mean
        std = timm_std if std is None else std
    return _checked("backbone.mean", mean, False), _checked("backbone.std", std, True)


def normalization(cfg: Mapping) -> tuple[list[float], list[float]]:
    """(mean, std) for the config's images: `dataset.*` where set, else the backbone's (see above)."""
    dataset = cfg.get("dataset") or {}
    mean, std = dataset.get("mean"), dataset.get("std")
    if mean is None or std is None:
        backbone_mean, backbone_std = backbone_normalization(cfg.get("backbone"))
        mean = backbone_mean if mean is None else mean
        std = backbone_std if std is None else std
    return _checked("dataset.mean", mean, False), _checked("dataset.std", std, True)


@functools.lru_cache(maxsize=32)
def _shift_and_scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """255 * mean and 1 / (255 * std) as (1, 3, 1, 1) tensors, made once per device (no copy per batch)."""
    shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    return shift.to(device), scale.to(device)


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 RGB images, (N, 3, H, W) or (3, H, W), wherever they are -> float32 (x / 255 - mean) / std there,
    in `memory_format` (channels_last for a batch): the one normalisation of training, evaluation, predict
    and the Python API. Float images are taken as normalised already (a dataset of one's own that
    normalises in its workers) and only laid out."""
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    if memory_format != torch.contiguous_format:
        batch = batch.contiguous(memory_format=memory_format)  # on uint8: a quarter of the float's bytes to move
    if batch.dtype == torch.uint8:
        shift, scale = _shift_and_scale(tuple(float(m) for m in mean), tuple(float(s) for s in std), batch.device)
        batch = (batch.float() - shift) * scale  # elementwise: the memory format is kept
    return batch if images.dim() == 4 else batch.squeeze(0)
