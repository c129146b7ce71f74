"""ResNet backbones dilated to output stride 8 or 16.

ResNet-50/101/152 come from torchvision (bottleneck blocks, `replace_stride_with_dilation`).
torchvision cannot dilate basic blocks, so ResNet-18/34 come from timm with its `output_stride`.
Both keep the original module names, so ImageNet files in torchvision or timm format load directly.
"""

from __future__ import annotations

import torch
import torchvision

from segtrain.errors import ConfigError, WeightsError
from segtrain.models.backbones.base import Backbone, load_backbone_weights
from segtrain.models.backbones.weights import require_timm_weights, require_url_weights

_TORCHVISION = {"resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
_TIMM = {"resnet18": 512, "resnet34": 512}
_DILATE = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


def _pretrained_failure(name: str, source: str, exc: Exception) -> WeightsError:
    hub = torch.hub.get_dir()
    return WeightsError(
        f"backbone.pretrained=true: could not get the ImageNet weights of {name} from {source} "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}). "
        f"Without internet, put the file in the cache ({hub}/checkpoints for torchvision, the Hugging "
        f"Face cache for timm) or pass backbone.weights=/path/to/{name}.pth, or set "
        "backbone.pretrained=false."
    )


class ResNetBackbone(Backbone):
    def __init__(
        self,
        name: str = "resnet50",
        output_stride: int = 16,
        pretrained: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in _DILATE:
            raise ConfigError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
        if name in _TORCHVISION:
            tv_weights = None
            if pretrained and not weights:
                tv_weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
                require_url_weights(tv_weights.url, name)
            try:
                net = torchvision.models.get_model(
                    name, weights=tv_weights, replace_stride_with_dilation=_DILATE[output_stride]
                )
            except (OSError, RuntimeError) as exc:
                raise _pretrained_failure(name, "torchvision", exc) from None
            del net.fc, net.avgpool
            self.timm = False
            width = _TORCHVISION[name]
        elif name in _TIMM:
            import timm

            if pretrained and not weights:
                require_timm_weights(name)
            try:
                net = timm.create_model(
                    name,
                    pretrained=bool(pretrained and not weights),
                    features_only=True,
                    out_indices=(1, 2, 3, 4),
                    output_stride=output_stride,
                )
            except (OSError, RuntimeError) as exc:
                raise _pretrained_failure(name, "timm (Hugging Face Hub)", exc) from None
            self.timm = True
            width = _TIMM[name]
        else:
            raise ConfigError(
                f"backbone.name={name!r} is not a ResNet this backbone knows; "
                f"choose one of {sorted(_TORCHVISION) + sorted(_TIMM)}"
            )
        self.net = net
        if weights:
            load_backbone_weights(self, weights, inner="net.")
        self.channels = [width // 8, width // 4, width // 2, width]
        self.strides = [min(s, output_stride) for s in (4, 8, 16, 32)]
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.timm:
            return self.net(x)
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        features = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            features.append(x)
        return features


