"""Official segmentation checkpoints (DRNSeg, DLA-Up, HRNetV2, HRNetV2 + OCR) load into segtrain's models; HRNet's fuse
layers upsample bilinearly; `model.bn_momentum`; the DRN weight host.

The files the tests write are in the official layouts: `to_official` below renames a segtrain state dict
the way the official code names the same tensors, adding what only the official files hold; the
sorted key:shape lists of its results equal those of the official modules (digests in
tests/data/official_seg_state_dicts.json).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config, fit_recording_start, node, tiny_overrides
from segtrain.engine.trainer import train
from segtrain.errors import ConfigError, WeightsError
from segtrain.models import build_model
from segtrain.models.backbones import drn as drn_module
from segtrain.models.official import map_official_state_dict

REFERENCE = json.loads((Path(__file__).parent / "data" / "official_seg_state_dicts.json").read_text())
QUICKSTART_HEAD = ("aspp_channels", "decoder_channels", "low_level_channels")  # DeepLab keys of the quickstart
DRN_C = ["conv1", "bn1", "relu"] + [f"layer{n}" for n in range(1, 9)]
DRN_D = [f"layer{n}" for n in range(0, 9)]


def _model(model: str, backbone: str, classes: int = 19, seed: int = 0, **model_extra) -> nn.Module:
    torch.manual_seed(seed)
    built = build_model(node("model", model, **model_extra), node("backbone", backbone), classes)
    # Random running statistics, so that a BatchNorm mapped to the wrong place changes the output.
    with torch.no_grad():
        for module in built.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return built.eval()


def _drnseg_official(state: dict, backbone: nn.Module) -> dict:
    children = DRN_C if backbone.arch == "C" else DRN_D
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            child, _, rest = key.removeprefix("backbone.").partition(".")
            out[f"base.{children.index(child)}.{rest}"] = value
        else:
            out[key.replace("classifier.", "seg.").replace("upsample.", "up.")] = value
    return out


def _dla_trees_with_unused_project(net: nn.Module):
    """(name, in, out) of the Trees of more than one level whose official `project` timm leaves out."""
    for name, module in net.named_modules():
        if type(module).__name__ == "DlaTree" and module.root is None:
            leaf = module
            while leaf.root is None:
                leaf = leaf.tree1
            c_in, c_out = leaf.tree1.conv1.in_channels, leaf.root.conv.out_channels
            if c_in != c_out:
                yield name, c_in, c_out


def _dla_up_official(state: dict, backbone: nn.Module) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.net."):
            out["base." + key.removeprefix("backbone.net.")] = value
        elif key.startswith("decoder.stages."):
            stage, part, index, rest = re.match(r"decoder\.stages\.(\d+)\.(\w+)\.(\d+)\.(.+)", key).groups()
            name = {"project": f"proj_{index}", "upsample": f"up_{index}", "nodes": f"node_{int(index) + 1}"}[part]
            out[f"dla_up.ida_{stage}.{name}.{rest}"] = value
        else:
            out[key.replace("classifier.", "fc.0.").replace("upsample.", "up.")] = value
    for name, c_in, c_out in _dla_trees_with_unused_project(backbone.net):
        out[f"base.{name}.project.0.weight"] = torch.randn(c_out, c_in, 1, 1)
        for stat, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            out[f"base.{name}.project.1.{stat}"] = torch.full((c_out,), fill)
    out["base.fc.weight"], out["base.fc.bias"] = torch.randn(1000, backbone.channels[-1], 1, 1), torch.randn(1000)
    return out


def _hrnet_official(state: dict, backbone: nn.Module) -> dict:
    """The FullModel file of HRNet's train.py: `model.` + the network, and the loss's class weights."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.net."):
            out[key.removeprefix("backbone.net.")] = value
        elif key.startswith("fuse.0."):
            out["last_layer.0." + key.removeprefix("fuse.0.")] = value
        elif key.startswith("fuse.1."):
            out["last_layer.1." + key.removeprefix("fuse.1.")] = value
        else:
            out[key.replace("classifier.", "last_layer.3.")] = value
    # The official 1x1 conv has a bias, which BN's running mean absorbs: the same function.
    bias = torch.randn_like(out["last_layer.1.running_mean"]) * 0.1
    out["last_layer.0.bias"] = bias
    out["last_layer.1.running_mean"] = out["last_layer.1.running_mean"] + bias
    full = {"model." + k: v for k, v in out.items()}
    full["loss.criterion.weight"] = torch.rand(19)
    return full


def _ocr_head_official(key: str) -> str:
    """seg_hrnet_ocr.py's name of a head tensor of segtrain's HRNetOCR."""
    block = "ocr_distri_head.object_context_block"
    bn_relu = {"0.0": "0", "0.1": "1.0", "1.0": "2", "1.1": "3.0"}  # conv, BNReLU, conv, BNReLU
    part, _, rest = key.partition(".")
    if part == "pixels":
        return "conv3x3_ocr." + rest
    if part == "classifier":
        return "cls_head." + rest
    if part == "aux_head":
        return key
    if part == "fuse":  # fuse.0 = (conv, BN, ReLU), then Dropout2d
        index, _, tail = rest.removeprefix("0.").partition(".")
        return f"ocr_distri_head.conv_bn_dropout.{'0' if index == '0' else '1.0'}.{tail}"
    branch, _, rest = rest.partition(".")  # attention.<branch>.<place>.<tensor>
    if branch in ("query", "key"):
        place, tail = rest[:3], rest[4:]
        return f"{block}.{'f_pixel' if branch == 'query' else 'f_object'}.{bn_relu[place]}.{tail}"
    index, _, tail = rest.partition(".")
    return f"{block}.{'f_down' if branch == 'value' else 'f_up'}.{'0' if index == '0' else '1.0'}.{tail}"


def _hrnet_ocr_official(state: dict, backbone: nn.Module) -> dict:
    """The FullModel file of the HRNet-OCR branch's train.py: `model.` + the network, the loss's class weights."""
    out = {key.removeprefix("backbone.net.") if key.startswith("backbone.net.") else _ocr_head_official(key): value
           for key, value in state.items()}
    full = {"model." + k: v for k, v in out.items()}
    full["loss.criterion.weight"] = torch.rand(19)
    return full


TO_OFFICIAL = {"drnseg": _drnseg_official, "dla_up": _dla_up_official, "hrnetv2": _hrnet_official,
               "hrnet_ocr": _hrnet_ocr_official}


def to_official(model_name: str, model: nn.Module) -> dict:
    # The released files predate PyTorch 0.4.1 (or use InPlaceABN): no num_batches_tracked.
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return TO_OFFICIAL[model_name](state, model.backbone)


def _digest(state: dict) -> dict:
    state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("loss.")}
    lines = sorted(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in state.items())
    return {"num_keys": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


LAYOUT_CASES = [
    ("drnseg", "drn_d_22", {}, "drnseg/drn_d_22/19"),
    ("drnseg", "drn_c_26", {}, "drnseg/drn_c_26/19"),
    ("dla_up", "dla34", {}, "dla_up/dla34/down2/19"),
    ("dla_up", "dla34", {"down_ratio": 4}, "dla_up/dla34/down4/19"),
    ("hrnetv2", "hrnet_w18", {}, "hrnetv2/w18/19"),
    ("hrnetv2", "hrnet_w48", {}, "hrnetv2/w48/19"),
    ("hrnet_ocr", "hrnet_w18", {}, "hrnet_ocr/w18/19"),
    ("hrnet_ocr", "hrnet_w48", {}, "hrnet_ocr/w48/19"),
]


@pytest.mark.parametrize("model_name,backbone_name,extra,reference", LAYOUT_CASES, ids=[c[3] for c in LAYOUT_CASES])
def test_written_files_have_the_official_key_layout(model_name, backbone_name, extra, reference):
    with torch.device("meta"):
        model = build_model(node("model", model_name, **extra), node("backbone", backbone_name), 19)
    assert _digest(to_official(model_name, model)) == REFERENCE[reference]


LOAD_CASES = [("drnseg", "drn_d_22", {}), ("drnseg", "drn_c_26", {}), ("dla_up", "dla34", {}),
              ("dla_up", "dla34", {"down_ratio": 4}), ("hrnetv2", "hrnet_w18", {}), ("hrnet_ocr", "hrnet_w18", {})]


@pytest.mark.parametrize("model_name,backbone_name,extra", LOAD_CASES,
                         ids=[f"{m}-{b}-{e}" for m, b, e in LOAD_CASES])
def test_official_checkpoints_load_strictly_with_identical_outputs(tmp_path, model_name, backbone_name, extra):
    source = _model(model_name, backbone_name, seed=1, **extra)
    path = tmp_path / "official.pth"
    torch.save(to_official(model_name, source), path)
    target = _model(model_name, backbone_name, seed=2, **extra)
    state = torch.load(path, weights_only=True)
    target.load_state_dict(map_official_state_dict(target, state, str(path)), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = source(x)["out"], target(x)["out"]
    if model_name == "hrnetv2":  # (m + b) - b rounds
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


def test_hrnet_head_computes_the_official_last_layer_with_its_conv_bias(tmp_path):
    """Independent of the mapping: the official head (conv with bias, BN, ReLU, conv) built from the file."""
    source = _model("hrnetv2", "hrnet_w18", seed=3)
    official = to_official("hrnetv2", source)
    model = _model("hrnetv2", "hrnet_w18", seed=4)
    model.load_state_dict(map_official_state_dict(model, official), strict=True)
    width = model.fuse[0].in_channels
    last_layer = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 19, 1))
    last_layer.load_state_dict({k.removeprefix("model.last_layer."): v for k, v in official.items()
                                if k.startswith("model.last_layer.")}, strict=False)
    last_layer.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(x)
        size = features[0].shape[-2:]
        fused = torch.cat([features[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                           for f in features[1:]], dim=1)
        expected = last_layer(fused)
        # Random weights make HRNet's activations large: compare relative to their scale.
        torch.testing.assert_close(model.decode(features)["out"], expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))


def test_segtrain_and_unknown_layouts_pass_through_unchanged():
    model = _model("drnseg", "drn_d_22")
    own = model.state_dict()
    assert map_official_state_dict(model, own) is own
    other = {"conv.weight": torch.zeros(1)}
    assert map_official_state_dict(model, other) is other


def test_official_file_of_another_family_or_shape_is_refused_naming_file_and_keys(tmp_path):
    official = to_official("drnseg", _model("drnseg", "drn_d_22"))
    with pytest.raises(WeightsError, match=r"f\.pth holds an official DRNSeg .*model=drnseg"):
        map_official_state_dict(_model("dla_up", "dla34"), official, "f.pth")
    with pytest.raises(WeightsError, match=r"f\.pth is an official DRNSeg .*shape mismatch \['classifier.weight"):
        map_official_state_dict(_model("drnseg", "drn_d_22", classes=5), official, "f.pth")
    renamed = map_official_state_dict(_model("drnseg", "drn_d_22", classes=5), official, "f.pth", strict=False)
    assert renamed["classifier.weight"].shape == (19, 512, 1, 1)  # renamed only; the caller matches shapes
    with pytest.raises(WeightsError, match=r"f\.pth is an official DRNSeg .*missing keys \['backbone.layer3.2.conv1"):
        map_official_state_dict(_model("drnseg", "drn_d_38"), official, "f.pth")
    with pytest.raises(WeightsError, match=r"f\.pth holds an official DRNSeg model .*backbone=drn_c_26"):
        map_official_state_dict(_model("drnseg", "resnet18"), official, "f.pth")


@pytest.mark.parametrize("model_name,backbone_name", [("drnseg", "drn_c_26"), ("dla_up", "dla34"),
                                                      ("hrnetv2", "hrnet_w18"), ("hrnet_ocr", "hrnet_w18")])
def test_backbone_weights_take_the_backbone_part_of_an_official_model(tmp_path, model_name, backbone_name):
    source = _model(model_name, backbone_name, seed=5)
    path = tmp_path / "cityscapes_model.pth"
    torch.save({"state_dict": to_official(model_name, source)}, path)
    torch.manual_seed(6)
    # 7 classes: the file's 19-class head is left out.
    loaded = build_model(node("model", model_name), node("backbone", backbone_name, weights=str(path)), 7)
    expected, got = source.backbone.state_dict(), loaded.backbone.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected if not k.endswith("num_batches_tracked"))


def _drnseg_run(shapes_root, **values):
    """A 2-iteration DRN-D-22 DRNSeg run on the tiny shapes data (quickstart's DeepLab head keys removed)."""
    return compose_config("train", tiny_overrides(shapes_root, **{
        "model": "drnseg", "backbone": "drn_d_22", "trainer.max_iters": 2, "trainer.val_interval": 2,
        "trainer.ckpt_interval": 2, **values}) + [f"~model.{key}" for key in QUICKSTART_HEAD])


@pytest.mark.slow
def test_train_starts_from_the_backbone_of_an_official_drnseg_file(tmp_path, shapes_root):
    path = tmp_path / "drn_d_22_cityscapes.pth"
    source = _model("drnseg", "drn_d_22", seed=7)
    torch.save(to_official("drnseg", source), path)
    result = train(_drnseg_run(shapes_root, **{"backbone.weights": str(path)}), tmp_path / "run")
    assert len(result.history) == 2


def _bilinear_x2(x: torch.Tensor) -> torch.Tensor:
    """x2 bilinear upsampling with half-pixel centres (align_corners=False), written out: output pixel
    2i takes 1/4 of input i-1 and 3/4 of i, pixel 2i+1 3/4 of i and 1/4 of i+1 (edges clamped)."""
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        prev = t.index_select(dim, torch.clamp(torch.arange(n) - 1, 0, n - 1))
        nxt = t.index_select(dim, torch.clamp(torch.arange(n) + 1, 0, n - 1))
        even, odd = 0.25 * prev + 0.75 * t, 0.75 * t + 0.25 * nxt
        return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)
    return along(along(x, 2), 3)


def test_hrnet_fuse_layers_upsample_bilinearly():
    from timm.models.hrnet import HighResolutionModule

    backbone = _model("hrnetv2", "hrnet_w18").backbone
    upsamplers = [part for module in backbone.net.modules() if isinstance(module, HighResolutionModule)
                  for path in module.fuse_layers for layer in path if isinstance(layer, nn.Sequential)
                  for part in layer if isinstance(part, nn.Upsample)]
    # Stage 2: 1 up-path, stage 3 (4 modules): 3 each, stage 4 (3 modules): 6 each.
    assert len(upsamplers) == 1 + 4 * 3 + 3 * 6
    assert {(u.mode, u.align_corners) for u in upsamplers} == {("bilinear", False)}
    fuse = backbone.net.stage2[0].fuse_layers[0][1]  # branch 1 (stride 8) -> branch 0 (stride 4)
    x = torch.randn(1, fuse[0].in_channels, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(fuse(x), _bilinear_x2(fuse[1](fuse[0](x))))
        reference = F.interpolate(fuse[1](fuse[0](x)), size=(10, 14), mode="bilinear", align_corners=False)
        torch.testing.assert_close(fuse(x), reference, rtol=0, atol=0)


def test_hrnet_fuse_upsample_nearest_is_timms_and_bad_values_are_refused():
    backbone = build_model(node("model", "hrnetv2"), node("backbone", "hrnet_w18", fuse_upsample="nearest"),
                           3).backbone
    modes = {m.mode for m in backbone.net.modules() if isinstance(m, nn.Upsample)}
    assert modes == {"nearest"}
    with pytest.raises(ConfigError, match="backbone.fuse_upsample='cubic'"):
        build_model(node("model", "hrnetv2"), node("backbone", "hrnet_w18", fuse_upsample="cubic"), 3)
    with pytest.raises(ConfigError, match="backbone.size_divisor=16"):
        build_model(node("model", "hrnetv2"), node("backbone", "hrnet_w18", size_divisor=16), 3)


def test_hrnet_cityscapes_experiment_sets_bn_momentum_001_on_every_batchnorm():
    cfg = compose_config("train", ["experiment=hrnetv2_w48_cityscapes", "backbone.pretrained=false"])
    assert cfg.model.bn_momentum == 0.01
    assert cfg.backbone.fuse_upsample == "bilinear"
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.backbone, 19)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.01}


def test_bn_momentum_default_and_refusals():
    model = build_model(node("model", "drnseg"), node("backbone", "drn_d_22"), 3)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    model = build_model(node("model", "drnseg", bn_momentum=0.3), node("backbone", "drn_d_22"), 3)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.3}
    for bad in (0, 1.5, "fast", True):
        with pytest.raises(ConfigError, match="model.bn_momentum="):
            build_model(node("model", "drnseg", bn_momentum=bad), node("backbone", "drn_d_22"), 3)


def test_drn_weights_come_from_the_host_of_the_official_code():
    for name, url in drn_module.WEIGHT_URLS.items():
        assert re.fullmatch(rf"http://dl\.yf\.io/drn/{name}-[0-9a-f]{{8}}\.pth", url), url


@pytest.mark.slow
def test_init_from_an_official_drnseg_file_trains_with_its_weights(tmp_path, shapes_root):
    """A released 19-class Cityscapes DRNSeg starts a shapes run: every tensor loaded or, for the class
    count, re-initialised."""
    path = tmp_path / "drn_d_22_cityscapes.pth"
    source = _model("drnseg", "drn_d_22", seed=8)
    torch.save(to_official("drnseg", source), path)
    trainer, weights, result = fit_recording_start(_drnseg_run(shapes_root, init_from=str(path)), tmp_path / "run")
    report = trainer.run.init_report
    assert sorted(report.reinitialised) == ["classifier.bias", "classifier.weight", "upsample.weight"]
    assert report.file_classes == 19 and not report.kept and not report.unused
    expected = source.state_dict()
    for name in report.loaded:
        assert torch.equal(weights[name], expected[name]), name
    assert len(report.loaded) == len([k for k in expected if not k.endswith("num_batches_tracked")]) - 3
    assert [h["iteration"] for h in result.history] == [1, 2]


def test_init_from_an_official_file_of_another_family_is_refused(tmp_path, shapes_root):
    from segtrain.engine.init_from import load_init_weights

    path = tmp_path / "hrnet_w18_cityscapes.pth"
    torch.save(to_official("hrnetv2", _model("hrnetv2", "hrnet_w18")), path)
    with pytest.raises(WeightsError, match=rf"init_from={re.escape(str(path))} holds an official HRNetV2 .*"
                                           r"model=hrnetv2"):
        load_init_weights(_model("drnseg", "drn_d_22", classes=5), path)
