"""Models: a backbone (list of feature maps) plus a head, built from the `model` and `backbone` nodes."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain.config import NORMALIZATION_KEYS
from segtrain.errors import ConfigError
from segtrain.instantiate import instantiate_checked

# Keys of the `model` node that segtrain applies to the built model rather than passing to its class.
MODEL_WIDE_KEYS = ("bn_momentum", "bn_eps")
# The parts a per-part BatchNorm setting names: {backbone: x, head: y}.
BN_PARTS = ("backbone", "head")


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_setting(model_cfg: DictConfig | dict, key: str, low_open: float, high: float, hint: str) -> dict[str, float]:
    """`model.<key>` as {part: value}: a number applies to both parts, a mapping to the parts it names."""
    value = model_cfg.get(key)
    if value is None:
        return {}
    if isinstance(value, (DictConfig, dict)):
        unknown = sorted(set(value) - set(BN_PARTS))
        if unknown:
            raise ConfigError(f"model.{key}: parts are {', '.join(BN_PARTS)}; got {unknown}")
        parts = {part: value[part] for part in BN_PARTS if value.get(part) is not None}
    else:
        parts = dict.fromkeys(BN_PARTS, value)
    for part, number in parts.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not low_open < number <= high:
            raise ConfigError(f"model.{key}={value!r}: {hint}")
        parts[part] = float(number)
    return parts


def apply_bn_settings(model: nn.Module, model_cfg: DictConfig | dict) -> None:
    """`model.bn_momentum` and `model.bn_eps` on the built model: every BatchNorm of the part they name
    (the backbone, or the head: everything else), or of both for a plain number."""
    momentum = _bn_setting(model_cfg, "bn_momentum", 0.0, 1.0,
                           "the BatchNorm momentum is a number in (0, 1] (PyTorch's default 0.1; 0.01 in HRNet's "
                           "official code; 1 - decay for TensorFlow's), or {backbone: x, head: y}, or null")
    eps = _bn_setting(model_cfg, "bn_eps", 0.0, 1.0,
                      "the BatchNorm epsilon is a number in (0, 1] (PyTorch's default 1e-5), or "
                      "{backbone: x, head: y}, or null")
    backbone = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else None
    in_backbone = {id(m) for m in _batchnorms(backbone)} if backbone is not None else set()
    for layer in _batchnorms(model):
        part = "backbone" if id(layer) in in_backbone else "head"
        if part in momentum:
            layer.momentum = momentum[part]
        if part in eps:
            layer.eps = eps[part]


def build_backbone(backbone_cfg: DictConfig) -> nn.Module:
    # backbone.mean/std describe the weights' input statistics for the data pipeline, not the network.
    return instantiate_checked("backbone", backbone_cfg, drop=NORMALIZATION_KEYS)


def build_model(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int) -> nn.Module:
    """Backbone, then model; `model.bn_momentum` / `bn_eps` (null: each layer's own) then apply to the
    BatchNorms of both, or of the part they name, as the recipes that set them do (HRNet's official code:
    momentum 0.01 everywhere; TensorFlow DeepLab: decay 0.9997 in the head, the backbone's own)."""
    apply_bn_settings(nn.Module(), model_cfg)  # refuse a bad value before building anything
    backbone = build_backbone(backbone_cfg)
    model = instantiate_checked("model", model_cfg, drop=MODEL_WIDE_KEYS, backbone=backbone,
                                num_classes=num_classes)
    apply_bn_settings(model, model_cfg)
    return model


def backbone_for_inference(backbone_cfg: DictConfig, output_stride: int | None) -> DictConfig:
    """The backbone node for a network that receives trained weights: no pretrained download, and at
    `output_stride` where given (dilation changes no weight shape; the ASPP rates follow the stride)."""
    if output_stride is not None:
        if backbone_cfg.get("output_stride") is None:
            raise ConfigError(f"eval.output_stride: backbone '{backbone_cfg.get('name')}' has no output_stride to "
                              "change (only dilated ResNet / Xception backbones do)")
        backbone_cfg = OmegaConf.merge(backbone_cfg, {"output_stride": int(output_stride)})
    return OmegaConf.merge(backbone_cfg, {"pretrained": False, "weights": None})
