"""Any timm model with `features_only` as a backbone: Xception-65, HRNet, DLA and the rest of timm."""

from __future__ import annotations

from typing import Any

import torch

from segtrain.errors import ConfigError, WeightsError
from segtrain.models.backbones.base import Backbone, load_backbone_weights
from segtrain.models.backbones.weights import require_timm_weights

# Keys of a full timm checkpoint that a features_only model lacks (heads and classifiers).
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "incre_modules.", "downsamp_modules.",
                       "final_layer.")


class TimmBackbone(Backbone):
    """timm encoder returning the feature maps at `out_indices`, with timm's declared channels/strides.

    `output_stride` (8 or 16) dilates the encoder where timm supports it (ResNets, aligned Xception).
    `size_divisor` pads inputs so every stage divides evenly; it defaults to the largest stride, which
    HRNet and DLA need (their branches are fused by exact 2x resampling).
    `model_kwargs` go to timm.create_model, e.g. {feature_location: ""} for HRNet's raw branches.
    """

    def __init__(
        self,
        name: str,
        output_stride: int | None = None,
        out_indices: list[int] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        size_divisor: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if name not in timm.list_models():
            raise ConfigError(f"backbone.name={name!r} is not a timm model (see timm.list_models())")
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride is not None:
            if output_stride not in (8, 16, 32):
                raise ConfigError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
            kwargs["output_stride"] = output_stride
        if pretrained and not weights:
            require_timm_weights(name)
        try:
            self.net = timm.create_model(name, features_only=True, pretrained=bool(pretrained and not weights),
                                         **kwargs)
        except TypeError as exc:
            raise ConfigError(f"timm model {name!r} does not accept these backbone options {kwargs}: {exc}") from None
        except (OSError, RuntimeError, ValueError) as exc:
            if pretrained and not weights:
                raise WeightsError(
                    f"backbone.pretrained=true: could not get the ImageNet weights of timm model {name!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}). Without "
                    "internet, pre-fill the Hugging Face cache (HF_HOME) on a connected machine, or pass "
                    f"backbone.weights=/path/to/{name}.pth (a timm state dict), or set backbone.pretrained=false."
                ) from None
            raise ConfigError(f"timm could not build {name!r} with {kwargs}: {exc}") from None
        if weights:
            load_backbone_weights(self, weights, inner="net.", ignore_prefixes=CLASSIFIER_PREFIXES)
        self.channels = list(self.net.feature_info.channels())
        self.strides = list(self.net.feature_info.reduction())
        self.size_divisor = int(size_divisor) if size_divisor else max(32, max(self.strides))
        if output_stride is not None:
            # Dilated encoders need no padding beyond their (smaller) output stride.
            self.size_divisor = int(size_divisor) if size_divisor else 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))
