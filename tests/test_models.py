import pytest
import torch
from omegaconf import OmegaConf

from segtrain.errors import ConfigError
from segtrain.models import build_model, resize

MODEL = {"_target_": "segtrain.models.deeplab.DeepLabV3Plus", "aspp_channels": 16, "decoder_channels": 16,
         "low_level_channels": 8, "aux_weight": 0.0}


def _model(name: str = "resnet18", output_stride: int = 16, **model_extra):
    backbone = {"_target_": "segtrain.models.backbones.resnet.ResNetBackbone", "name": name,
                "output_stride": output_stride, "pretrained": False}
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


@pytest.mark.parametrize("size_in,size_out", [((16, 16), (64, 64)), ((33, 47), (129, 185)), ((128, 100), (64, 50)),
                                              ((1, 3), (5, 7)), ((7, 9), (100, 3)), ((50, 41), (17, 23))])
def test_training_resize_equals_bilinear_interpolation(size_in, size_out):
    x = torch.randn(2, 3, *size_in, requires_grad=True)
    assert resize._use_matmul(x)  # the matrix form is the one a CPU training step takes
    fast = resize.resize_to(x, size_out)
    reference = torch.nn.functional.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    grad_out = torch.randn_like(reference)
    (fast_grad,) = torch.autograd.grad(fast, x, grad_out)
    (reference_grad,) = torch.autograd.grad(reference, x, grad_out)
    torch.testing.assert_close(fast, reference, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast_grad, reference_grad, rtol=0, atol=1e-4)


def test_resize_uses_the_direct_kernel_outside_cpu_training():
    x = torch.randn(1, 4, 8, 8)
    assert not resize._use_matmul(x)  # inference: no gradient wanted
    assert not resize._use_matmul(x.requires_grad_().contiguous(memory_format=torch.channels_last))
    assert not resize._use_matmul(torch.randn(1, 2, 300, 8, requires_grad=True))  # dense matrices too big
    assert not resize._use_matmul(torch.randn(1, 4, 1, 1, requires_grad=True))  # may be channels_last: keep it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not resize._use_matmul(x)  # the products would run in bf16
    with torch.no_grad():
        assert not resize._use_matmul(x)
    out = resize.resize_to(x.contiguous(memory_format=torch.channels_last), (16, 16))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the memory format is kept
    assert resize.resize_to(x, (8, 8)) is x
