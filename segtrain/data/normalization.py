"""The mean/std an image is normalised with: the dataset's if set, else the backbone's pretrained weights'.

Every command takes it from here, so training, validation, eval, predict and the TensorBoard images
normalise identically. Precedence, per statistic:
1. `dataset.mean` / `dataset.std` when not null (a user's explicit choice);
2. `backbone.mean` / `backbone.std`: the statistics the backbone's pretrained weights were trained with
   (conf/backbone/*.yaml carry them, e.g. 0.5 for Xception-65's TF weights); null or absent there means
   "what timm's pretrained_cfg declares for `backbone.name`" (conf/backbone/timm.yaml), which only a timm
   backbone can fill in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from segtrain.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

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


def normalise_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB uint8 HxWx3 -> float32 CHW tensor, (image / 255 - mean) / std: the one normalisation of
    evaluation and inference."""
    import numpy as np
    import torch

    array = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
