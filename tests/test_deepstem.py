"""The deep-stem dilated ResNet of the official PSPNet code (hszhao/semseg), and PSPNet's align_corners."""

import pytest
import torch
import torch.nn.functional as F

from conftest import node
from segtrain.errors import ConfigError, WeightsError
from segtrain.models import build_backbone, build_model
from segtrain.models.backbones.deepstem_resnet import DeepStemResNet
from segtrain.models.pspnet import PSPNet

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def official_layout(depth: str, batches_tracked: bool = True) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of hszhao/semseg's `resnet{depth}_v2.pth`, from its model/resnet.py (deep_base=True):
    conv1 3x3 3->64 / bn1, conv2 3x3 64->64 / bn2, conv3 3x3 64->128 / bn3, Bottleneck layers entered with
    128 channels (conv1 1x1, conv2 3x3, conv3 1x1 x4, downsample.0 conv + downsample.1 BN on the first block),
    fc 2048->1000."""
    layout: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, ch: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{stat}"] = (ch,)
        if batches_tracked:
            layout[f"{prefix}.num_batches_tracked"] = ()

    for n, (in_ch, out_ch) in enumerate([(3, 64), (64, 64), (64, 128)], start=1):
        layout[f"conv{n}.weight"] = (out_ch, in_ch, 3, 3)
        bn(f"bn{n}", out_ch)
    in_ch = 128
    for n, (planes, count) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth]), start=1):
        for b in range(count):
            block = f"layer{n}.{b}"
            layout[f"{block}.conv1.weight"] = (planes, in_ch, 1, 1)
            bn(f"{block}.bn1", planes)
            layout[f"{block}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{block}.bn2", planes)
            layout[f"{block}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{block}.bn3", planes * 4)
            if b == 0:
                layout[f"{block}.downsample.0.weight"] = (planes * 4, in_ch, 1, 1)
                bn(f"{block}.downsample.1", planes * 4)
            in_ch = planes * 4
    layout["fc.weight"] = (1000, 2048)
    layout["fc.bias"] = (1000,)
    return layout


def write_official_file(path, depth: str, batches_tracked: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {k: (torch.randint(0, 100, shape) if k.endswith("num_batches_tracked") else torch.randn(shape))
             for k, shape in official_layout(depth, batches_tracked).items()}
    torch.save(state, path)
    return state


def test_resnet101_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        backbone = DeepStemResNet("resnet101_deepstem")
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    official = {k: v for k, v in official_layout("resnet101").items() if not k.startswith("fc.")}
    assert ours == official
    # The official ImageNet model: torchvision's ResNet-101 (44,549,160) + 123,776 for the deep stem and the
    # 128-channel entry of layer1.
    with_fc = sum(torch.Size(s).numel() for k, s in official_layout("resnet101").items() if "num_batches" not in k
                  and "running" not in k)
    assert with_fc == sum(p.numel() for p in backbone.parameters()) + 2048 * 1000 + 1000 == 44_672_936


@pytest.mark.parametrize("batches_tracked", [True, False])  # files saved before PyTorch 0.4.1 lack the counters
def test_official_file_loads_strictly_through_backbone_weights(tmp_path, batches_tracked):
    path = tmp_path / "resnet50_v2.pth"
    state = write_official_file(path, "resnet50", batches_tracked)
    backbone = build_backbone(node("backbone", "resnet50_deepstem", weights=str(path)))
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_a_file_of_another_layout_is_refused_naming_the_keys(tmp_path):
    path = tmp_path / "resnet50_v2.pth"
    state = write_official_file(path, "resnet50")
    state["conv1.weight"] = torch.randn(64, 3, 7, 7)  # torchvision's 7x7 stem
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys .*conv2.weight|shape mismatch \['conv1.weight'\]"):
        build_backbone(node("backbone", "resnet50_deepstem", weights=str(path)))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def test_pretrained_reads_the_official_file_from_the_torch_hub_cache(torch_home):
    state = write_official_file(torch_home / "resnet50_v2.pth", "resnet50")
    backbone = build_backbone(node("backbone", "resnet50_deepstem", pretrained=True))
    assert torch.equal(backbone.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_pretrained_without_the_file_is_one_line_naming_where_it_goes(torch_home):
    with pytest.raises(WeightsError) as info:
        build_backbone(node("backbone", "resnet101_deepstem", pretrained=True))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("backbone.pretrained=true: the ImageNet weights of resnet101_deepstem (resnet101_v2.pth)")
    assert "drive.google.com" in message and f"put it at {torch_home / 'resnet101_v2.pth'}" in message
    assert "backbone.weights=/path/to/resnet101_v2.pth" in message and "backbone.pretrained=false" in message


def test_output_stride_8_dilates_every_block_of_layer3_by_2_and_of_layer4_by_4():
    backbone = DeepStemResNet("resnet50_deepstem", output_stride=8)
    for layer, dilation in ((backbone.layer3, 2), (backbone.layer4, 4)):
        assert [(b.conv2.dilation, b.conv2.padding, b.conv2.stride) for b in layer] == \
            [((dilation, dilation), (dilation, dilation), (1, 1))] * len(layer)
        assert layer[0].downsample[0].stride == (1, 1)
    assert [b.conv2.dilation for b in (*backbone.layer1, *backbone.layer2)] == [(1, 1)] * 7
    assert backbone.layer2[0].conv2.stride == (2, 2)
    with torch.no_grad():
        features = backbone.eval()(torch.randn(1, 3, 33, 33))
    # Sizes of the official (H - 1) / 8 + 1 rule: 33 -> 5 at stride 8.
    assert [tuple(f.shape[1:]) for f in features] == [(256, 9, 9), (512, 5, 5), (1024, 5, 5), (2048, 5, 5)]
    assert backbone.strides == [4, 8, 8, 8] and backbone.channels == [256, 512, 1024, 2048]


def test_output_stride_16_and_bad_values():
    backbone = DeepStemResNet("resnet50_deepstem", output_stride=16)
    assert backbone.strides == [4, 8, 16, 16]
    assert {b.conv2.dilation for b in backbone.layer4} == {(2, 2)} and backbone.layer3[0].conv2.stride == (2, 2)
    with pytest.raises(ConfigError, match="backbone.output_stride must be 8, 16 or 32"):
        DeepStemResNet("resnet50_deepstem", output_stride=4)
    with pytest.raises(ConfigError, match="backbone.name='resnet34_deepstem' is not a deep-stem ResNet"):
        DeepStemResNet("resnet34_deepstem")


class _TinyBackbone(torch.nn.Module):
    """Two stride-8 maps from one conv: enough for PSPNet's pyramid and aux head."""

    channels = [4, 8]
    strides = [8, 8]
    size_divisor = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x):
        y = self.conv(x)
        return [y[:, :4], y]


def _pspnet(align_corners: bool) -> PSPNet:
    torch.manual_seed(0)
    return PSPNet(_TinyBackbone(), 3, channels=8, aux_channels=4, align_corners=align_corners).eval()


def test_align_corners_resizes_the_pyramid_and_the_logits_with_corners_aligned():
    aligned, default = _pspnet(True), _pspnet(False)
    image = torch.randn(1, 3, 57, 57)  # 8 * 7 + 1: the official input size rule
    with torch.no_grad():
        out_aligned, out_default = aligned(image)["out"], default(image)["out"]
        features = aligned.backbone(image)
        pooled = aligned.ppm.stages[1](features[-1])  # 2x2
        logits = aligned.head(aligned.ppm(features[-1]))
    assert aligned.ppm.align_corners and not default.ppm.align_corners
    assert torch.allclose(aligned.ppm(features[-1])[:, 8 + 2:8 + 4],
                          F.interpolate(pooled, size=(7, 7), mode="bilinear", align_corners=True))
    assert torch.allclose(out_aligned, F.interpolate(logits, size=(57, 57), mode="bilinear", align_corners=True))
    # Corners aligned: the logits' corner pixels are the stride-8 logits' corners; not so by default.
    assert torch.allclose(out_aligned[..., 0, 0], logits[..., 0, 0])
    assert torch.allclose(out_aligned[..., -1, -1], logits[..., -1, -1])
    assert not torch.allclose(out_default, out_aligned)


def test_align_corners_must_be_a_boolean():
    with pytest.raises(ConfigError, match="model.align_corners must be true or false, got 'yes'"):
        PSPNet(_TinyBackbone(), 3, align_corners="yes")


def test_pspnet_experiments_use_the_official_backbone_and_resizes():
    from conftest import compose_config

    for experiment in ("pspnet_r101_voc", "pspnet_r101_cityscapes"):
        cfg = compose_config("train", [f"experiment={experiment}", "backbone.pretrained=false"])
        assert cfg.backbone.name == "resnet101_deepstem" and cfg.backbone.output_stride == 8
        assert cfg.model.align_corners is True
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
        assert model.align_corners and model.ppm.align_corners
        assert {b.conv2.dilation for b in model.backbone.layer4} == {(4, 4)}
