"""Any timm model with `features_only` as a backbone: ResNets, Xception-65, HRNet, DLA and the rest of timm.

Feature maps come out of a pure forward, without forward hooks, so `torch.compile` traces the encoder
without graph breaks. timm's default `features_only` wrappers are hook-free for ResNets, DLA and HRNet
(FeatureListNet and HRNet's own feature model); for models whose default is the hook-based
FeatureHookNet (aligned Xception and a few others) segtrain asks for timm's `forward_intermediates`
getter instead. That wrapper keeps timm's own parameter names under `net.model.`, so a plain timm file
given as `backbone.weights` loads there, less the layers timm prunes after the last tapped feature.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from segtrain.errors import ConfigError, first_line
from segtrain.models.backbones.base import Backbone, load_backbone_weights, weights_origin
from segtrain.models.backbones.weights import require_timm_weights, timm_download_error, timm_weights_tag

# Keys of a full timm checkpoint that a features_only model lacks (heads and classifiers).
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "incre_modules.", "downsamp_modules.",
                       "final_layer.")


class TimmBackbone(Backbone):
    """timm encoder returning the feature maps at `out_indices`, with timm's declared channels/strides.

    `name` is a timm model name, optionally with a pretrained tag (`resnet50.tv_in1k`) choosing the
    weights that `pretrained=true` loads.
    `output_stride` (8 or 16) dilates the encoder where timm supports it (ResNets, aligned Xception).
    `size_divisor` pads inputs so every stage divides evenly; it defaults to the largest stride, which
    HRNet and DLA need (their branches are fused by exact 2x resampling).
    `model_kwargs` go to timm.create_model, e.g. {feature_location: ""} for HRNet's raw branches.
    `multi_grid` (ResNets): DeepLab's multi-grid, the 3x3 convolutions of the last stage's blocks dilated
    by the stage's rate times these unit rates (TensorFlow DeepLab's resnet_v1_beta: [1, 2, 4] gives
    rates 2, 4, 8 at output stride 16 and 4, 8, 16 at 8); null keeps timm's dilations.
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
        multi_grid: list[int] | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.name = name

        # is_model, not list_models(): it accepts pretrained tags (`resnet50.tv_in1k`).
        if not timm.is_model(name):
            raise ConfigError(f"backbone.name={name!r} is not a timm model (see timm.list_models())")
        if "." in name and name not in timm.list_pretrained(name):
            raise ConfigError(f"backbone.name={name!r}: timm has no weights tagged {name.split('.', 1)[1]!r}; "
                              f"tags: {timm.list_pretrained(name.split('.')[0] + '.*')}")
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride is not None:
            if output_stride not in (8, 16, 32):
                raise ConfigError(f"backbone.output_stride must be 8, 16 or 32, got {output_stride}")
            kwargs["output_stride"] = output_stride
        download = bool(pretrained and not weights)
        if download:
            require_timm_weights(name)
        self.weights_origin = weights_origin(weights, pretrained, timm_weights_tag(name) if download else "")
        try:
            self.net = _features_model(name, download, kwargs)
        except TypeError as exc:
            raise ConfigError(f"backbone: timm model {name!r} does not accept the options {kwargs}: "
                              f"{first_line(str(exc))}") from None
        except (IndexError, KeyError, AssertionError) as exc:
            # timm indexes its stage list with out_indices and asserts on an output_stride it cannot dilate to.
            raise ConfigError(f"backbone: timm cannot build {name!r} with {kwargs} ({first_line(exc)}); "
                              "check backbone.out_indices and backbone.output_stride") from None
        except (OSError, RuntimeError, ValueError) as exc:
            if download:
                raise timm_download_error(name, exc) from None
            raise ConfigError(f"backbone: timm cannot build {name!r} with {kwargs}: {first_line(str(exc))}") from None
        if weights:
            self._load_weights_file(weights)
        if multi_grid is not None:
            apply_multi_grid(self.net, name, [int(rate) for rate in multi_grid])
        self.channels = list(self.net.feature_info.channels())
        self.strides = list(self.net.feature_info.reduction())
        self.size_divisor = int(size_divisor) if size_divisor else max(32, max(self.strides))
        if output_stride is not None:
            # Dilated encoders need no padding beyond their (smaller) output stride.
            self.size_divisor = int(size_divisor) if size_divisor else 1

    def _load_weights_file(self, path: str) -> None:
        """A timm file (or one saved from this backbone): the getter wrapper holds timm's model under
        `net.model.` and pruned the layers after the last tapped feature, whose weights computed nothing."""
        from timm.models._features import FeatureGetterNet

        if isinstance(self.net, FeatureGetterNet):
            model = self.net.model
            load_backbone_weights(self, path, inner="net.model.", ignore_prefixes=CLASSIFIER_PREFIXES,
                                  pruned=lambda key: pruned_by_timm(model, key))
        else:
            load_backbone_weights(self, path, inner="net.", ignore_prefixes=CLASSIFIER_PREFIXES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))

    def tap_before_activation(self, index: int) -> None:
        """Feature `index` becomes the BatchNorm output before the ReLU that timm's tap follows.

        TensorFlow DeepLab decodes Xception-65 from `entry_flow/block2/unit_1/xception_module/
        separable_conv2_pointwise` (research/deeplab/core/feature_extractor.py, DECODER_END_POINTS): the
        second separable conv's pointwise BatchNorm, before the ReLU that the third (strided) separable
        conv starts with; timm taps the input of that conv, i.e. after the ReLU. Only the tap changes: the
        block computes what it did, with the same parameters and parameter names.
        """
        from timm.models._features import FeatureGetterNet
        from timm.models.xception_aligned import XceptionModule

        model = self.net.model if isinstance(self.net, FeatureGetterNet) else None
        ends = getattr(model, "feature_ends", None)
        if model is None or ends is None or index >= len(ends) - 1:
            raise ConfigError(f"model.decoder_tap=pre_act: backbone {self.name!r} has no tap inside a block before "
                              "an activation (aligned Xception has); use model.decoder_tap=post_act")
        block = model.blocks[ends[index]]
        if type(block) is not XceptionModule or not isinstance(block.stack[-2], nn.ReLU):
            raise ConfigError(f"model.decoder_tap=pre_act: backbone {self.name!r} block {ends[index]} does not end in "
                              "ReLU -> separable conv; use model.decoder_tap=post_act")
        block.__class__ = pre_activation_tap_module()


def apply_multi_grid(net: nn.Module, name: str, unit_rates: list[int]) -> list[int]:
    """Dilate the 3x3 convolution of block i of ResNet's last stage (`layer4`) by rate * unit_rates[i],
    rate being the stage's dilation (the last block's: timm leaves the first block at the previous
    stage's); returns the dilations set. Dilation changes no weight, so weights load as before."""
    stage = getattr(net, "layer4", None)
    blocks = list(stage) if isinstance(stage, nn.Sequential) else []
    convs = [getattr(block, "conv2", None) for block in blocks]
    if not blocks or not all(isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) for c in convs):
        raise ConfigError(f"backbone.multi_grid: {name!r} is not a ResNet with 3x3 convolutions in layer4 "
                          "(bottleneck or basic blocks); use null")
    if len(unit_rates) != len(blocks) or not all(rate >= 1 for rate in unit_rates):
        raise ConfigError(f"backbone.multi_grid: one unit rate >= 1 per block of layer4 ({len(blocks)} blocks, "
                          f"e.g. [1, 2, 4]), got {unit_rates}")
    rate = convs[-1].dilation[0]
    for conv, unit_rate in zip(convs, unit_rates):
        conv.dilation = (rate * unit_rate,) * 2
        conv.padding = (rate * unit_rate,) * 2
    return [c.dilation[0] for c in convs]


@functools.cache
def pre_activation_tap_module() -> type:
    """timm's aligned-Xception module whose feature tap is the tensor before the last ReLU of its stack
    (the ReLU the strided separable conv starts with) instead of after it; same layers, same output.
    Built on first use: timm is imported only when a timm backbone is."""
    from timm.models.xception_aligned import XceptionModule

    class PreActivationTapXceptionModule(XceptionModule):
        def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pre_activation = x
            for layer in list(self.stack)[:-2]:
                pre_activation = layer(pre_activation)
            # Not the stack's own ReLU: it is in-place and would overwrite the tap.
            out = self.stack[-1](torch.relu(pre_activation))
            return self._residual(out, x), pre_activation

    return PreActivationTapXceptionModule


def _features_model(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm's features_only model of `name`; the forward_intermediates getter where timm's default is
    the hook-based FeatureHookNet (its hooks write into a dict during the forward: graph breaks)."""
    import timm
    from timm.models._features import FeatureHookNet

    if "feature_cls" in kwargs:  # the user chose a wrapper
        return timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    default = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    if isinstance(default, FeatureHookNet):
        getter = timm.create_model(name, features_only=True, pretrained=pretrained, feature_cls="getter", **kwargs)
        if callable(getattr(getter.model, "forward_intermediates", None)):
            return getter
    if pretrained:
        return timm.create_model(name, features_only=True, pretrained=True, **kwargs)
    return default


def pruned_by_timm(net: nn.Module, key: str) -> bool:
    """Whether `key` (relative to `net`) belongs to a layer that timm's prune_intermediate_layers replaced
    by an Identity or removed (set to None)."""
    module: Any = net
    for part in key.split(".")[:-1]:
        module = getattr(module, part, None)  # Sequential/ModuleList children too ("0", "conv3")
        if module is None or isinstance(module, nn.Identity):
            return True
        if not isinstance(module, nn.Module):
            return False
    return False
