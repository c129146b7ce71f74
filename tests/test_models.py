import pytest
import torch
from omegaconf import OmegaConf

from segtrain.errors import ConfigError
from segtrain.models import build_model, resize

MODEL = {"_target_": "segtrain.models.deeplab.DeepLabV3Plus", "aspp_channels": 16, "decoder_channels": 16,
         "low_level_channels": 8}


def _model(name: str = "resnet18", output_stride: int = 16, **model_extra):
    backbone = {"_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": name,
                "output_stride": output_stride, "out_indices": [1, 2, 3, 4], "pretrained": False}
    return build_model(OmegaConf.create({**MODEL, **model_extra}), OmegaConf.create(backbone), 3)


@pytest.mark.parametrize("size", [(65, 65), (64, 96), (33, 47), (32, 32)])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_have_the_input_size(size, output_stride):
    model = _model(output_stride=output_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert set(out) == {"out"}
    assert out["out"].shape == (1, 3, *size)
    assert out["out"].dtype == torch.float32


@pytest.mark.parametrize("name,strides", [("resnet18", [4, 8, 16, 16]), ("resnet50", [4, 8, 16, 16])])
def test_backbone_declares_channels_and_strides(name, strides):
    model = _model(name)
    features = model.backbone(torch.randn(1, 3, 64, 64))
    assert model.backbone.strides == strides
    assert [f.shape[1] for f in features] == model.backbone.channels
    assert [64 // f.shape[-1] for f in features] == strides


def test_output_stride_8_dilates_the_last_two_stages():
    model = _model("resnet50", output_stride=8)
    assert model.backbone.strides == [4, 8, 8, 8]
    # ASPP rates follow the output stride: 6/12/18 at 16 become 12/24/36 at 8.
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:4]]
    assert rates == [12, 24, 36]


def test_training_step_backward_works_for_odd_sizes():
    model = _model()
    out = model(torch.randn(2, 3, 51, 37))["out"]
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model_key_names_itself():
    with pytest.raises(ConfigError, match="model.aspp_chanels"):
        _model(aspp_chanels=3)


def test_unknown_backbone_name_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone.name"):
        _model("resnet7")


def test_backbone_names_take_timm_pretrained_tags():
    assert _model("resnet50.tv_in1k").backbone.strides == [4, 8, 16, 16]
    with pytest.raises(ConfigError, match=r"^backbone.name='resnet50.tv_in2k': timm has no weights tagged") as info:
        _model("resnet50.tv_in2k")
    assert "\n" not in str(info.value) and "resnet50.tv_in1k" in str(info.value)  # the tags to choose from


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_from_timm_computes_what_torchvisions_dilated_resnet_did(output_stride):
    """The timm ResNet-50 has torchvision's module names, so torchvision-format weights load, and the
    dilations of torchvision's replace_stride_with_dilation, so they compute the same features."""
    import torchvision

    torch.manual_seed(0)
    dilate = {8: [False, True, True], 16: [False, False, True]}[output_stride]
    reference = torchvision.models.resnet50(replace_stride_with_dilation=dilate).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics: identity BNs would hide a swapped layer
        for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
    backbone = _model("resnet50.tv_in1k", output_stride).backbone.eval()
    expected_keys = ["net." + k for k in reference.state_dict() if not k.startswith("fc.")]
    assert list(backbone.state_dict()) == expected_keys  # net.conv1.weight, net.layer1.0.conv1.weight, ...
    backbone.load_state_dict({"net." + k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 49, 67)
    with torch.no_grad():
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        layers = (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
        for layer, feature in zip(layers, backbone(x)):
            y = layer(y)
            assert torch.equal(feature, y)


def test_resize_is_bilinear_interpolation_in_training_and_inference():
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    reference = torch.nn.functional.interpolate(x, size=(20, 5), mode="bilinear", align_corners=False)
    assert torch.equal(resize.resize_to(x, (20, 5)), reference)
    assert torch.equal(resize.resize_to(x, torch.Size([20, 5])), reference)
    with torch.no_grad():
        assert torch.equal(resize.resize_to(x, (20, 5)), reference)
    assert resize.resize_to(x, (7, 9)) is x  # already the size: no copy, no op in an exported graph


@pytest.mark.parametrize("model_extra,backbone_name,needle", [
    ({"_target_": "segtrain.models.dla_up.DLAUp", "down_ratio": 2}, "resnet50",
     "model.down_ratio=2 needs a backbone feature at stride 2"),
    ({"_target_": "segtrain.models.hrnet.HRNetV2", "branches": 5}, "resnet18", "model.branches=5"),
    ({"dropout": 1.5}, "resnet18", "model.dropout is a probability"),
    ({"_target_": "segtrain.models.pspnet.PSPNet", "aux_index": 4}, "resnet18", "model.aux_index=4"),
    ({"_target_": "segtrain.models.pspnet.PSPNet", "bins": []}, "resnet18", "model.bins"),
])
def test_model_config_that_cannot_work_is_a_one_line_config_error(model_extra, backbone_name, needle):
    node = dict(model_extra) if "_target_" in model_extra else {**MODEL, **model_extra}
    backbone = {"_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": backbone_name,
                "output_stride": 16, "out_indices": [1, 2, 3, 4]}
    with pytest.raises(ConfigError, match=needle) as info:
        build_model(OmegaConf.create(node), OmegaConf.create(backbone), 3)
    assert "\n" not in str(info.value)


def test_deeplabv3plus_without_a_stride_4_feature_names_the_backbone():
    with pytest.raises(ConfigError, match=r"^backbone: DeepLab v3\+ decodes with a stride-4 feature.*\[8, 16, 16\]"):
        build_model(OmegaConf.create(MODEL), OmegaConf.create({
            "_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": "resnet18",
            "output_stride": 16, "out_indices": [2, 3, 4]}), 3)


def test_auxiliary_outputs_declare_the_training_outputs():
    psp = {"_target_": "segtrain.models.pspnet.PSPNet", "channels": 8, "aux_channels": 8}
    backbone = {"_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": "resnet18",
                "output_stride": 8, "out_indices": [1, 2, 3, 4]}
    with_aux = build_model(OmegaConf.create(psp), OmegaConf.create(backbone), 3).train()
    without = build_model(OmegaConf.create({**psp, "aux": False}), OmegaConf.create(backbone), 3).train()
    x = torch.randn(2, 3, 32, 32)
    assert with_aux.auxiliary_outputs() == ("aux",) and set(with_aux(x)) == {"out", "aux"}
    assert without.auxiliary_outputs() == () and set(without(x)) == {"out"}
    assert _model().auxiliary_outputs() == ()
    assert set(with_aux.eval()(x)) == {"out"}  # auxiliary heads are for training only
