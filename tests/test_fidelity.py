"""The paper recipes against their official code (issue 24): DeepLab's decoder tap, BatchNorm, weight decay,
multi-grid and multiply-adds; semseg's test-time protocol; the DRN, DLA and HRNet augmentations.

Where the official code cannot run here (TensorFlow, old PyTorch), the test states the official rule it
checks and where it comes from, and computes the expected values from that rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtrain.engine.optim import build_optimizer
from segtrain.errors import ConfigError
from segtrain.models import build_backbone, build_model
from tests.conftest import compose_config

XCEPTION = {"_target_": "segtrain.models.backbones.timm_encoder.TimmBackbone", "name": "xception65",
            "output_stride": 16, "pretrained": False}
SMALL_HEAD = {"_target_": "segtrain.models.deeplab.DeepLabV3Plus", "aspp_channels": 16, "decoder_channels": 16,
              "low_level_channels": 8}


def _recipe(experiment: str, *extra: str):
    return compose_config("train", [f"experiment={experiment}", "backbone.pretrained=false", *extra])


def _decoder_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    seen = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["x"] = inputs[0].clone()

    handle = model.low_level[0].register_forward_hook(keep)
    with torch.no_grad():
        model(image)
    handle.remove()
    return seen["x"]


# --- 1. DeepLab v3+ X65: the decoder's tap ---

def test_xception65_recipe_decodes_the_pre_activation_tap_with_the_same_parameters():
    cfg = _recipe("deeplabv3plus_xception65_voc")
    assert cfg.model.decoder_tap == "pre_act"
    torch.manual_seed(0)
    tf_tap = build_model(OmegaConf.merge(SMALL_HEAD, {"decoder_tap": "pre_act"}), OmegaConf.create(XCEPTION), 3).eval()
    timm_tap = build_model(OmegaConf.create(SMALL_HEAD), OmegaConf.create(XCEPTION), 3).eval()
    timm_tap.load_state_dict(tf_tap.state_dict())  # same names: the tap changes no parameter
    assert sum(p.numel() for p in tf_tap.parameters()) == sum(p.numel() for p in timm_tap.parameters())
    image = torch.randn(1, 3, 65, 65)
    pre, post = _decoder_input(tf_tap, image), _decoder_input(timm_tap, image)
    assert (pre < 0).float().mean() > 0.2  # the BatchNorm output, before the ReLU
    assert (post >= 0).all()
    torch.testing.assert_close(torch.relu(pre), post)  # timm's tap is relu(TF's tap), exactly
    # The block itself computes what it did: the deepest feature is unchanged.
    with torch.no_grad():
        torch.testing.assert_close(tf_tap.backbone(image)[-1], timm_tap.backbone(image)[-1])


def test_os16_weights_load_into_the_os8_network_with_the_pre_activation_tap():
    head = OmegaConf.merge(SMALL_HEAD, {"decoder_tap": "pre_act"})
    os16 = build_model(head, OmegaConf.create(XCEPTION), 3)
    os8 = build_model(head, OmegaConf.merge(XCEPTION, {"output_stride": 8}), 3).eval()
    os8.load_state_dict(os16.state_dict())  # strict
    assert (_decoder_input(os8, torch.randn(1, 3, 65, 65)) < 0).any()


def test_pre_activation_tap_is_refused_for_backbones_without_one():
    resnet = {**XCEPTION, "name": "resnet18", "out_indices": [1, 2, 3, 4]}
    with pytest.raises(ConfigError, match="model.decoder_tap=pre_act"):
        build_model(OmegaConf.merge(SMALL_HEAD, {"decoder_tap": "pre_act"}), OmegaConf.create(resnet), 3)
    with pytest.raises(ConfigError, match="model.decoder_tap must be one of"):
        build_model(OmegaConf.merge(SMALL_HEAD, {"decoder_tap": "relu"}), OmegaConf.create(XCEPTION), 3)


# --- 4. DeepLab BatchNorm, weight decay, align_corners ---

def _batchnorm_settings(model: nn.Module) -> tuple[set, set]:
    """{(momentum, eps)} of the backbone's BatchNorms and of the head's, momentum rounded to 1e-9."""
    in_backbone = {id(m) for m in model.backbone.modules()}
    parts: tuple[set, set] = (set(), set())
    for layer in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        parts[0 if id(layer) in in_backbone else 1].add((round(layer.momentum, 9), layer.eps))
    return parts


def test_xception65_recipe_batchnorm_is_tensorflows():
    # research/deeplab/core/feature_extractor.py: xception arg scope batch_norm_decay=0.9997, epsilon=1e-3;
    # model.py (ASPP, decoder) batch_norm_params decay 0.9997, epsilon 1e-5. PyTorch momentum = 1 - decay.
    cfg = _recipe("deeplabv3plus_xception65_voc")
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.backbone, 21)
    assert _batchnorm_settings(model) == ({(round(1 - 0.9997, 9), 1e-3)}, {(round(1 - 0.9997, 9), 1e-5)})
    assert model.align_corners is True


def test_r101_recipe_batchnorm_is_tensorflows():
    # feature_extractor.py: resnet arg scope batch_norm_decay=0.95, epsilon=1e-5; model.py: 0.9997 / 1e-5.
    cfg = _recipe("deeplabv3plus_r101_voc")
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.backbone, 21)
    assert _batchnorm_settings(model) == ({(round(1 - 0.95, 9), 1e-5)}, {(round(1 - 0.9997, 9), 1e-5)})


def test_bn_settings_refuse_unknown_parts_and_bad_values():
    for key, bad in (("bn_eps", 0), ("bn_eps", "small"), ("bn_momentum", {"neck": 0.1}), ("bn_momentum", 2.0)):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            build_model(OmegaConf.merge(SMALL_HEAD, {key: bad}), OmegaConf.create(XCEPTION), 3)


def test_xception65_recipe_puts_batchnorm_depthwise_and_bias_in_zero_decay_groups():
    # TF DeepLab regularises conv and pointwise weights only: slim.batch_norm has no regularizer,
    # regularize_depthwise=False (xception arg scope) and _split_separable_conv2d's depthwise
    # weights_regularizer=None, and the logits conv's bias has no biases_regularizer.
    cfg = _recipe("deeplabv3plus_xception65_voc")
    model = build_model(cfg.model, cfg.backbone, 21)
    optimizer = build_optimizer(cfg.optimizer, model)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in model.parameters())
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            exempt = isinstance(module, nn.BatchNorm2d) or depthwise or name == "bias"
            assert decay_of[id(param)] == (0.0 if exempt else 4e-5), (module, name)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) > 60  # Xception's 3x3 convolutions and the separable ASPP / decoder


def test_no_weight_decay_refuses_unknown_kinds():
    cfg = _recipe("deeplabv3plus_r101_voc", "optimizer.no_weight_decay=[norm,gamma]")
    with pytest.raises(ConfigError, match="optimizer.no_weight_decay"):
        build_optimizer(cfg.optimizer, build_model(OmegaConf.create(SMALL_HEAD), OmegaConf.create(
            {**XCEPTION, "name": "resnet18", "out_indices": [1, 2, 3, 4]}), 3))


def test_align_corners_reaches_the_decoder_and_final_resize():
    torch.manual_seed(0)
    aligned = build_model(OmegaConf.merge(SMALL_HEAD, {"align_corners": True}), OmegaConf.create(XCEPTION), 3).eval()
    plain = build_model(OmegaConf.create(SMALL_HEAD), OmegaConf.create(XCEPTION), 3).eval()
    plain.load_state_dict(aligned.state_dict())
    with torch.no_grad():
        image = torch.randn(1, 3, 65, 65)
        assert not torch.allclose(aligned(image)["out"], plain(image)["out"])


# --- 3. DeepLab v3+ R101: multi-grid and multiply-adds ---

@pytest.mark.parametrize("output_stride,dilations", [(16, [2, 4, 8]), (8, [4, 8, 16])])
def test_r101_recipe_block4_dilations_are_multi_grid_1_2_4(output_stride, dilations):
    # tensorflow/models research/deeplab common.py: "Set multi_grid = [1, 2, 4] when using provided
    # 'resnet_v1_{50,101}_beta' checkpoints"; resnet_v1_beta.py builds block4's units with
    # unit_rate = multi_grid[i], run at rate * unit_rate, rate = 2 at output stride 16 and 4 at 8
    # (slim's stack_blocks_dense doubles it at each stride it replaces).
    cfg = _recipe("deeplabv3plus_r101_voc", f"backbone.output_stride={output_stride}")
    assert list(cfg.backbone.multi_grid) == [1, 2, 4]
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone)
    convs = [block.conv2 for block in backbone.net.layer4]
    assert [c.dilation[0] for c in convs] == dilations
    assert [c.padding[0] for c in convs] == dilations


def test_multi_grid_refuses_a_backbone_without_layer4_and_a_wrong_length():
    with pytest.raises(ConfigError, match="backbone.multi_grid"):
        build_backbone(OmegaConf.create({**XCEPTION, "multi_grid": [1, 2, 4]}))
    with pytest.raises(ConfigError, match="one unit rate >= 1 per block"):
        build_backbone(OmegaConf.create({**XCEPTION, "name": "resnet50", "multi_grid": [1, 2]}))


def _same(size: int, stride: int) -> int:
    return math.ceil(size / stride)  # TensorFlow 'SAME' padding


def resnet101_backbone_macs(size: int, beta_stem: bool, stride_in_last_unit: bool) -> int:
    """Multiply-adds of ResNet-101's convolutions at output stride 16, counted from the layer shapes.

    beta_stem: TF DeepLab's resnet_v1_101_beta root (3x3 convs 3->64 stride 2, 64->64, 64->128) instead
    of the 7x7 3->64 one. stride_in_last_unit: slim's resnet_v1 places a block's stride in its last unit
    (resnet_v1_beta_block) where torchvision places it in a stage's first; strides past 16 become dilation.
    """
    stem = _same(size, 2)
    macs = stem * stem * (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9) if beta_stem else stem * stem * 3 * 64 * 49
    width, side, stride_so_far = (128 if beta_stem else 64), _same(stem, 2), 4
    for index, (base, units, stride) in enumerate([(64, 3, 2), (128, 4, 2), (256, 23, 2), (512, 3, 1)]):
        for unit in range(units):
            if stride_in_last_unit:
                unit_stride = stride if unit == units - 1 else 1
            else:
                unit_stride = 2 if unit == 0 and index > 0 else 1
            if stride_so_far * unit_stride > 16:
                unit_stride = 1  # output stride 16: dilated instead
            out = _same(side, unit_stride)
            macs += side * side * width * base + out * out * base * base * 9 + out * out * base * base * 4
            if width != base * 4:
                macs += out * out * width * base * 4  # projection shortcut
            stride_so_far *= unit_stride
            side, width = out, base * 4
    return macs


def _gmacs(module: nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.device("meta"), counter, torch.no_grad():
        module.eval()(torch.empty(1, 3, size, size))
    return counter.get_total_flops() / 2e9


@pytest.mark.slow
def test_r101_multiply_adds_and_the_gap_to_the_papers_101_28b():
    cfg = _recipe("deeplabv3plus_r101_voc")
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.backbone, 21)
    ours = _gmacs(model, 513)
    backbone = _gmacs(model.backbone, 513)
    # The shape formula reproduces the counter on our (torchvision-layout, 7x7-stem) backbone exactly.
    assert resnet101_backbone_macs(513, beta_stem=False, stride_in_last_unit=False) / 1e9 == pytest.approx(backbone)
    beta_stem = (resnet101_backbone_macs(513, True, False) - resnet101_backbone_macs(513, False, False)) / 1e9
    tf_backbone = resnet101_backbone_macs(513, True, True) / 1e9
    tf_network = ours - backbone + tf_backbone
    assert ours == pytest.approx(92.82, abs=0.005)  # README, conf/experiment/deeplabv3plus_r101_voc.yaml
    assert beta_stem == pytest.approx(7.14, abs=0.005)
    assert tf_network - ours - beta_stem == pytest.approx(-2.15, abs=0.005)  # the stride in the last unit
    assert tf_network == pytest.approx(97.81, abs=0.005)
    assert 101.28 - tf_network == pytest.approx(3.47, abs=0.01)  # not attributed (paper Table 3)


# --- 2. semseg's test-time protocol ---

class TinyNet(nn.Module):
    """A small fully convolutional network with segtrain's model interface."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Conv2d(8, classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"out": torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                                       align_corners=True)}


def semseg_scale_process(model: nn.Module, image: torch.Tensor, crop: int, stride_rate: float = 2 / 3) -> torch.Tensor:
    """hszhao/semseg tool/test.py scale_process + net_process, restated: pad the image centred to at least
    the window (mean pixel = 0 after normalisation), windows at min(i * stride, size - crop) for
    i < ceil((size - crop) / stride) + 1, each window batched with its mirror, softmax, the mirror's
    probabilities flipped back and the two averaged; window probabilities summed and divided by the count,
    then the padding cropped off."""
    _, _, height, width = image.shape
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = torch.nn.functional.pad(image, (left, pad_w - left, top, pad_h - top))
    new_h, new_w = padded.shape[-2:]
    stride = math.ceil(crop * stride_rate)
    sums = torch.zeros(1, 4, new_h, new_w, dtype=torch.float64)
    counts = torch.zeros(1, 1, new_h, new_w, dtype=torch.float64)
    for index_h in range(math.ceil((new_h - crop) / stride) + 1):
        for index_w in range(math.ceil((new_w - crop) / stride) + 1):
            end_h, end_w = min(index_h * stride + crop, new_h), min(index_w * stride + crop, new_w)
            window = padded[..., end_h - crop:end_h, end_w - crop:end_w]
            with torch.no_grad():
                probs = model(torch.cat([window, window.flip(3)]))["out"].softmax(dim=1)
            sums[..., end_h - crop:end_h, end_w - crop:end_w] += ((probs[:1] + probs[1:].flip(3)) / 2).double()
            counts[..., end_h - crop:end_h, end_w - crop:end_w] += 1
    return (sums / counts)[..., top:top + height, left:left + width]


def semseg_test(model: nn.Module, image: torch.Tensor, crop: int, base_size: int, scales: list[float]) -> torch.Tensor:
    """semseg's test(): per scale, the long side resized to round(scale * base_size) (the short side
    rounded from it), scale_process, its probabilities resized back to the image; the mean over scales."""
    _, _, height, width = image.shape
    total = torch.zeros(1, 4, height, width, dtype=torch.float64)
    for scale in scales:
        long = round(scale * base_size)
        size = (long, round(long / height * width)) if height > width else (round(long / width * height), long)
        scaled = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
        probs = semseg_scale_process(model, scaled, crop)
        total += torch.nn.functional.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
    return total / len(scales)


@pytest.mark.parametrize("protocol,size", [("semseg_slide473_flip", (300, 420)), ("semseg_slide713_flip", (600, 1100)),
                                           ("semseg_slide473_ms_flip", (200, 150))])
def test_semseg_protocols_compute_semsegs_scale_process(protocol, size):
    from segtrain.engine.inference import InferenceSettings, infer

    evaluation = compose_config("eval", [f"protocol={protocol}", "ckpt=unused.pt"]).eval
    assert (evaluation.flip, evaluation.average, evaluation.pad) == ("per_window", "probs", "centred")
    settings = InferenceSettings.from_config(evaluation)
    torch.manual_seed(0)
    model = TinyNet().eval()
    image = torch.randn(1, 3, *size)
    crop = int(evaluation.crop_size[0])
    expected = semseg_test(model, image, crop, int(evaluation.resize_long_side), list(evaluation.scales))
    scores = infer(model, image, settings)
    assert scores.shape == expected.shape
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)
    # The order matters: logits averaged over windows and the whole image flipped differ by more.
    logits_order = InferenceSettings("slide", settings.crop_size, settings.stride, settings.scales, flip=True,
                                     resize_long_side=settings.resize_long_side)
    assert (infer(model, image, logits_order).double() - expected).abs().max() > 1e-4


def test_centred_padding_puts_the_image_in_the_middle_of_the_window():
    from segtrain.engine.inference import InferenceSettings, slide_logits

    seen = []

    class Recorder(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            seen.append(x.clone())
            return {"out": x[:, :1]}

    image = torch.ones(1, 3, 5, 8)
    for pad, rows in (("centred", [2, 3, 4, 5, 6]), ("end", [0, 1, 2, 3, 4])):
        seen.clear()
        out = slide_logits(Recorder(), image, (10, 8), (7, 7), InferenceSettings("slide", (10, 8), (7, 7), pad=pad))
        assert torch.equal(out, torch.ones(1, 1, 5, 8))
        assert seen[0][0, 0, :, 0].nonzero().flatten().tolist() == rows


@pytest.mark.parametrize("bad", ["flip=sideways", "average=median", "pad=left", "resize_long_side=4"])
def test_protocol_option_values_are_checked(bad):
    from segtrain.config_checks import check_config

    with pytest.raises(ConfigError, match=f"eval.{bad.split('=')[0]}"):
        check_config(compose_config("eval", ["ckpt=unused.pt", f"eval.{bad}"]))


# --- 5, 6. DRN / DLA / HRNet augmentations ---

def _augment(experiment: str, **changes: object):
    from segtrain.config import AugmentConfig

    augment = compose_config("train", [f"experiment={experiment}"]).dataset.augment
    return AugmentConfig(**{**OmegaConf.to_container(augment), **changes})


def _step(transform, kind: type):
    return next(t for t in transform.pipeline.transforms if isinstance(t, kind))


@pytest.mark.parametrize("experiment", ["drn_d_105_cityscapes", "dla34_up_cityscapes"])
def test_drn_and_dla_rotate_by_whole_degrees_before_scaling(experiment):
    # data_transforms.py RandomRotate: angle = random.randint(0, angle * 2) - angle; segment.py appends
    # RandomRotate before RandomScale.
    from segtrain.data.transforms import RandomRotation, ResampledRandomScale, train_transform

    transform = train_transform(_augment(experiment), [0.5] * 3, [0.5] * 3)
    kinds = [type(t) for t in transform.pipeline.transforms]
    assert kinds.index(RandomRotation) < kinds.index(ResampledRandomScale)
    rotation = _step(transform, RandomRotation)
    angles = set()
    for seed in range(300):
        rotation.set_random_seed(seed)
        angles.add(rotation.get_params()["angle"])
    assert angles <= set(range(-10, 11)) and len(angles) == 21  # every whole angle, nothing between


def test_reflection_border_fills_rotated_corners_with_image_pixels_and_the_mask_with_ignore():
    import numpy as np

    from segtrain.data.transforms import RandomRotation

    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :, 0] = np.arange(60, dtype=np.uint8)[None, :] * 4 + 10  # no pixel equals the fill
    mask = np.ones((40, 60), np.uint8)
    reflect = RandomRotation(10, True, True, (0.0, 0.0, 0.0), 255)
    constant = RandomRotation(10, True, False, (0.0, 0.0, 0.0), 255)
    rotated, rotated_mask = reflect.apply(image, angle=10.0), reflect.apply_to_mask(mask, angle=10.0)
    assert rotated_mask[0, 0] == 255 and rotated_mask[20, 30] == 1  # uncovered corner: ignore
    assert rotated[0, 0, 0] >= 10  # reflected image content, not the fill
    assert constant.apply(image, angle=10.0)[0, 0, 0] == 0
    assert (rotated[..., 0] > 0).all()


def test_reflection_padding_to_the_crop_mirrors_without_repeating_the_edge():
    import numpy as np

    from segtrain.data.transforms import ReflectPadToSize

    image = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)
    pad = ReflectPadToSize(7, 4, 255)
    padded, padded_mask = pad.apply(image), pad.apply_to_mask(np.zeros((3, 4), np.uint8))
    # pad_reflection of ucbdrive/dla, restated: 2 rows on top are rows 2, 1 (reflect, edge not repeated),
    # 2 rows below are rows 1, 0.
    np.testing.assert_array_equal(padded[:, 0, 0], image[[2, 1, 0, 1, 2, 1, 0], 0, 0])
    assert (padded_mask[:2] == 255).all() and (padded_mask[2:5] == 0).all() and (padded_mask[5:] == 255).all()


def test_antialias_bicubic_scale_resizes_with_pil_and_truncates_sizes():
    import numpy as np
    from PIL import Image

    from segtrain.data.transforms import ResampledRandomScale

    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    scale = ResampledRandomScale(0.5, 2.0)
    for ratio, resample in ((0.73, Image.LANCZOS), (1.37, Image.BICUBIC)):
        size = (int(ratio * 70), int(ratio * 50))
        expected = np.asarray(Image.fromarray(image).resize(size, resample))
        np.testing.assert_array_equal(scale.apply(image, ratio=ratio), expected)
        assert scale.apply_to_mask(np.zeros((50, 70), np.uint8), ratio=ratio).shape == (size[1], size[0])


def test_hrnet_scales_are_the_discrete_set_of_base_dataset():
    # HRNet-Semantic-Segmentation lib/datasets/base_dataset.py: 0.5 + random.randint(0, 16) / 10.0.
    from segtrain.data.transforms import DiscreteRandomScale, train_transform

    transform = train_transform(_augment("hrnetv2_w48_cityscapes"), [0.5] * 3, [0.5] * 3)
    scale = _step(transform, DiscreteRandomScale)
    official = [0.5 + k / 10.0 for k in range(17)]
    assert scale.scales == pytest.approx(official)
    drawn = set()
    for seed in range(400):
        scale.set_random_seed(seed)
        drawn.add(round(scale.get_params()["scale"], 6))
    assert drawn == {round(v, 6) for v in official}


def test_augmentation_option_values_are_checked():
    from segtrain.config import AugmentConfig
    from segtrain.data.transforms import train_transform

    for changes, key in (({"image_border": "wrap"}, "image_border"), ({"scale_resample": "area"}, "scale_resample"),
                         ({"rotate": 7.5, "rotate_integer": True}, "rotate_integer"),
                         ({"scale_resample": "antialias_bicubic", "scale_step": 0.25}, "scale_resample")):
        with pytest.raises(ConfigError, match=f"dataset.augment.{key}"):
            train_transform(AugmentConfig(**changes), [0.5] * 3, [0.5] * 3)


# --- issue 22 item 3: DeepLab v3+ X65 on Cityscapes ---

def test_xception65_cityscapes_experiment_is_the_model_zoo_recipe():
    cfg = _recipe("deeplabv3plus_xception65_cityscapes")
    assert cfg.dataset.name == "cityscapes" and cfg.backbone.name == "xception65.tf_in1k"
    assert list(cfg.dataset.augment.crop_size) == [769, 769] and cfg.trainer.max_iters == 90000
    assert cfg.backbone.output_stride == 16 and list(cfg.model.aspp_rates) == [6, 12, 18]
    assert (cfg.model.decoder_tap, cfg.model.align_corners, cfg.model.separable) == ("pre_act", True, True)
    assert list(cfg.optimizer.no_weight_decay) == ["norm", "depthwise", "bias"]
    assert cfg.optimizer.weight_decay == 4e-5 and cfg.eval.mode == "whole" and cfg.eval.output_stride is None
    evaluation = compose_config("eval", ["ckpt=unused.pt", "protocol=deeplab_os8_cityscapes_ms_flip"]).eval
    assert list(evaluation.scales) == [0.75, 1.0, 1.25] and evaluation.flip and evaluation.output_stride == 8
