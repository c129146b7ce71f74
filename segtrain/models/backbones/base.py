"""The backbone contract, and loading a local weight file (`backbone.weights=`) into any backbone.

Pretrained downloads and caches live in segtrain.models.backbones.weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from segtrain.errors import ConfigError, WeightsError
from segtrain.models.official import official_backbone_state
from segtrain.weights_file import load_weights_file

# A backbone built without weights says so, with the key that would change it.
RANDOM_INIT = "random init: backbone.pretrained=false"


class Backbone(nn.Module):
    """forward(x) -> list of feature maps, finest first; `channels[i]` and `strides[i]` describe map i.

    `size_divisor` is the multiple the input height and width must have; the segmentor pads to it.
    `name` is the architecture's name (timm's model name, `drn_d_105`, ...): heads whose paper
    settings depend on the backbone family read it (DeepLab's `separable: auto`).
    `weights_origin` says what the weights start from (see `weights_origin`), for the start-up line.
    """

    channels: list[int]
    strides: list[int]
    size_divisor: int = 1
    name: str = ""
    weights_origin: str = RANDOM_INIT

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def weights_origin(weights: str | None, pretrained: bool, imagenet_tag: str) -> str:
    """Where a backbone's weights come from, in the precedence its constructor loads them: the file
    (`backbone.weights=PATH`), the ImageNet weights named by their tag, or random initialisation."""
    if weights:
        return f"backbone.weights={weights}"
    if pretrained:
        return f"ImageNet weights {imagenet_tag}"
    return RANDOM_INIT


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weight file (segtrain.weights_file: tensors and plain types only) and unwrap common containers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone.weights: file not found: {path}")
    obj = load_weights_file(path, setting="backbone.weights")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    inner: str = "",
    ignore_prefixes: tuple[str, ...] = ("fc.",),
    pruned: Callable[[str], bool] | None = None,
) -> None:
    """Load a weight file into `backbone` strictly, classifier keys aside.

    Accepts the library's own format (torchvision / timm / official DRN keys, which live under the
    `inner` submodule here), files saved from a segtrain backbone (keys already prefixed), and the
    backbone part of an official DRNSeg / DLA-Up / HRNetV2 segmentation model (segtrain.models.official).
    `pruned(key)`: whether a key of the library's layout belongs to a layer this backbone was built without.
    """
    state = official_backbone_state(backbone, read_state_dict(path), str(path))
    if inner and not any(k.startswith(inner) for k in state):
        state = {inner + k: v for k, v in state.items() if pruned is None or not pruned(k)}
    state = {k: v for k, v in state.items() if not k[len(inner):].startswith(ignore_prefixes)}
    own = backbone.state_dict()
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; load_state_dict fills it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path} does not match backbone {type(backbone).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatch {mismatched[:5]}"
        )
    backbone.load_state_dict(state, strict=True)

