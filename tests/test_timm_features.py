"""Hook-free timm features: the same maps as timm's hook-based wrapper, and its checkpoints still load."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet, FeatureHookNet

from conftest import compose_config
from segtrain.models import build_backbone
from segtrain.models.backbones.timm_encoder import TimmBackbone


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize(("output_stride", "out_indices"), [(16, None), (8, [1, 2, 4])])
def test_xception_features_equal_the_hook_wrapper_under_the_same_weights(output_stride, out_indices):
    kwargs = {"output_stride": output_stride} | ({"out_indices": tuple(out_indices)} if out_indices else {})
    torch.manual_seed(0)
    hooked = timm.create_model("xception65", features_only=True, **kwargs).eval()
    assert isinstance(hooked, FeatureHookNet) and _hooks(hooked) > 0
    backbone = TimmBackbone("xception65", output_stride=output_stride, out_indices=out_indices).eval()
    assert isinstance(backbone.net, FeatureGetterNet) and _hooks(backbone) == 0
    # The hook wrapper's own (flattened) keys load strictly.
    backbone.load_state_dict({f"net.{k}": v for k, v in hooked.state_dict().items()}, strict=True)
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


def test_checkpoints_and_weight_files_of_the_hook_layout_load_strictly(tmp_path):
    from segtrain.models.deeplab import DeepLabV3Plus

    torch.manual_seed(1)
    hooked = timm.create_model("xception65", features_only=True, output_stride=16)
    model = DeepLabV3Plus(TimmBackbone("xception65", output_stride=16), num_classes=3)
    # A segtrain checkpoint written before the change: FeatureHookNet keys under backbone.net.
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    old |= {f"backbone.net.{k}": v for k, v in hooked.state_dict().items()}
    assert "backbone.net.stem_0.conv.weight" in old
    model.load_state_dict(old, strict=True)
    assert torch.equal(model.backbone.net.model.stem[0].conv.weight, hooked.stem_0.conv.weight)
    # backbone.weights= files: timm's own layout (with its classifier) and the old segtrain layout.
    full = timm.create_model("xception65")
    timm_file, segtrain_file = tmp_path / "timm.pth", tmp_path / "old_segtrain.pth"
    torch.save(full.state_dict(), timm_file)
    torch.save({f"net.{k}": v for k, v in hooked.state_dict().items()}, segtrain_file)
    from_timm = TimmBackbone("xception65", output_stride=16, weights=str(timm_file))
    assert torch.equal(from_timm.net.model.blocks[7].stack.conv2.conv_pw.weight,
                       full.blocks[7].stack.conv2.conv_pw.weight)
    from_old = TimmBackbone("xception65", output_stride=16, weights=str(segtrain_file))
    assert torch.equal(from_old.net.model.stem[1].conv.weight, hooked.stem_1.conv.weight)
    # Layers timm prunes after the last tap (out_indices short of the last feature) had unused weights.
    short = timm.create_model("xception65", features_only=True, out_indices=(0, 1, 2))
    TimmBackbone("xception65", out_indices=[0, 1, 2]).load_state_dict(
        {f"net.{k}": v for k, v in short.state_dict().items()}, strict=True)
