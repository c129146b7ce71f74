"""The backbone contract and weight-file loading shared by every backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segtrain.errors import ConfigError, WeightsError


class Backbone(nn.Module):
    """forward(x) -> list of feature maps, finest first; `channels[i]` and `strides[i]` describe map i.

    `size_divisor` is the multiple the input height and width must have; the segmentor pads to it.
    """

    channels: list[int]
    strides: list[int]
    size_divisor: int = 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file safely (tensors and plain types only) and unwrap common containers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone.weights: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means the same thing to the user
        raise WeightsError(
            f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Only files of tensors and plain types are accepted (torch.load(weights_only=True))."
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(
    module: nn.Module, path: str | Path, ignore_prefixes: tuple[str, ...] = ("fc.",)
) -> None:
    """Load an ImageNet-format state dict into `module`, classifier keys aside, strictly."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path} does not match the backbone: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatch {mismatched[:5]}"
        )
    module.load_state_dict(state, strict=True)
