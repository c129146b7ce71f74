"""Any timm model with `features_only` as a backbone: ResNets, Xception-65, HRNet, DLA and the rest of timm.

Feature maps come out of a pure forward, without forward hooks, so `torch.compile` traces the encoder
without graph breaks. timm's default `features_only` wrappers are hook-free for ResNets, DLA and HRNet
(FeatureListNet and HRNet's own feature model); for models whose default is the hook-based
FeatureHookNet (aligned Xception and a few others) segtrain asks for timm's `forward_intermediates`
getter instead. That wrapper keeps timm's own parameter names under `net.model.`, so a plain timm file
given as `backbone.weights` loads there, less the layers timm prunes after the last tapped feature.
"""

from __future__ import annotations

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
