"""Hook-free timm features: the same maps as timm's hook-based wrapper, and plain timm files load."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet, FeatureHookNet

from conftest import compose_config
from segtrain.errors import WeightsError
from segtrain.models import build_backbone
from segtrain.models.backbones.timm_encoder import TimmBackbone


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.slow
@pytest.mark.parametrize(("output_stride", "out_indices"), [(16, None), (8, [1, 2, 4])])
def test_xception_features_equal_the_hook_wrapper_under_the_same_weights(tmp_path, output_stride, out_indices):
    kwargs = {"output_stride": output_stride} | ({"out_indices": tuple(out_indices)} if out_indices else {})
    torch.manual_seed(0)
    weights = tmp_path / "xception65.pth"
    torch.save(timm.create_model("xception65", output_stride=output_stride).state_dict(), weights)
    # timm loads the same file into its hook wrapper through its own local-file pretrained source.
    hooked = timm.create_model("xception65", features_only=True, pretrained=True,
                               pretrained_cfg_overlay={"file": str(weights)}, **kwargs).eval()
    assert isinstance(hooked, FeatureHookNet) and _hooks(hooked) > 0
    backbone = TimmBackbone("xception65", output_stride=output_stride, out_indices=out_indices,
                            weights=str(weights)).eval()
    assert isinstance(backbone.net, FeatureGetterNet) and _hooks(backbone) == 0
    assert backbone.channels == hooked.feature_info.channels()
    assert backbone.strides == hooked.feature_info.reduction()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected, got = hooked(x), backbone(x)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["resnet18", "xception65", "hrnet_w18", "dla34", "timm"])
def test_every_timm_backbone_config_extracts_features_without_hooks(name):
    backbone = build_backbone(compose_config("train", [f"backbone={name}"]).backbone)
    assert _hooks(backbone) == 0


@pytest.mark.slow
def test_timm_weight_files_load_strictly_into_the_getter_layout(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("xception65")
    timm_file = tmp_path / "timm.pth"
    torch.save(full.state_dict(), timm_file)  # timm's own keys (stem.0.conv.weight), classifier included
    from_timm = TimmBackbone("xception65", output_stride=16, weights=str(timm_file))
    assert torch.equal(from_timm.net.model.blocks[7].stack.conv2.conv_pw.weight,
                       full.blocks[7].stack.conv2.conv_pw.weight)
    # A file saved from this backbone holds its own keys (net.model.stem.0.conv.weight).
    own_file = tmp_path / "own.pth"
    torch.save(from_timm.state_dict(), own_file)
    reloaded = TimmBackbone("xception65", output_stride=16, weights=str(own_file))
    assert torch.equal(reloaded.net.model.stem[1].conv.weight, full.stem[1].conv.weight)
    # Layers timm prunes after the last tap (out_indices short of the last feature) have no place here.
    short = TimmBackbone("xception65", out_indices=[0, 1, 2], weights=str(timm_file))
    assert torch.equal(short.net.model.blocks[1].stack.conv1.conv_dw.weight,
                       full.blocks[1].stack.conv1.conv_dw.weight)


def test_a_file_of_timms_hook_wrapper_layout_is_refused(tmp_path):
    hooked = timm.create_model("xception65", features_only=True, output_stride=16)
    flattened = tmp_path / "flattened.pth"
    torch.save({f"net.{k}": v for k, v in hooked.state_dict().items()}, flattened)  # net.stem_0.conv.weight
    with pytest.raises(WeightsError, match=r"does not match backbone TimmBackbone: missing keys \['net.model.stem"):
        TimmBackbone("xception65", output_stride=16, weights=str(flattened))
