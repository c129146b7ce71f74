"""Whole-model checkpoints of the official segmentation code, in segtrain's key layout.

Four layouts are recognised, each from the code that wrote the released files:

- DRNSeg (fyu/drn segment.py): `base.N.*` (the DRN's children in order, avgpool and fc dropped:
  DRN-C conv1, bn1, relu, layer1..8; DRN-D layer0..8), `seg.*` (1x1 classifier), `up.weight`
  (frozen bilinear transposed conv). segtrain: `backbone.<child>.*`, `classifier.*`, `upsample.weight`.
- DLA-Up (ucbdrive/dla dla_up.py DLASeg): `base.*` (the DLA, with its ImageNet `fc`), `dla_up.ida_I.
  {proj_K, up_K, node_K}.*`, `fc.0.*`, `up.weight`. segtrain: `backbone.net.*` (timm's DLA, whose
  keys are the official ones), `decoder.stages.I.{project.K, upsample.K, nodes.K-1}.*`, `classifier.*`,
  `upsample.weight`. The official Trees of more than one level hold a `project` that their forward
  never uses (timm leaves it out); it is dropped.
- HRNetV2 (HRNet-Semantic-Segmentation seg_hrnet.py, saved through FullModel): `model.*` (or bare),
  `loss.criterion.weight` (class weights of the loss, not of the model: dropped), the HRNet stem,
  stages and transitions (timm's keys are the official ones), `last_layer.{0, 1, 3}` (1x1 conv with
  bias, BN, 1x1 classifier). segtrain: `backbone.net.*`, `fuse.{0, 1}` (the conv has no bias: the
  bias is folded into the BN's running mean, which is exact since BN subtracts a mean either way),
  `classifier.*`.

- HRNetV2 + OCR (HRNet-Semantic-Segmentation branch HRNet-OCR, seg_hrnet_ocr.py, saved through
  FullModel): the HRNet as above, `conv3x3_ocr.{0, 1}` (3x3 conv with bias, BN), `aux_head.{0, 1, 3}`,
  `ocr_distri_head.object_context_block.{f_pixel, f_object}.{0, 1.0, 2, 3.0}` (conv, BN, conv, BN),
  `...{f_down, f_up}.{0, 1.0}`, `ocr_distri_head.conv_bn_dropout.{0, 1.0}`, `cls_head`. segtrain:
  `backbone.net.*`, `pixels.{0, 1}`, `aux_head.*` (the same), `attention.{query, key}.{0, 1}.{0, 1}`,
  `attention.{value, project}.{0, 1}`, `fuse.0.{0, 1}`, `classifier.*`; every tensor keeps its shape.

A layout is recognised by its distinctive keys; a segtrain state dict never has them.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from segtrain.errors import WeightsError

State = dict[str, torch.Tensor]

DRN_C_CHILDREN = ("conv1", "bn1", "relu") + tuple(f"layer{n}" for n in range(1, 9))
DRN_D_CHILDREN = tuple(f"layer{n}" for n in range(0, 9))
IDA_KEY = re.compile(r"^dla_up\.ida_(\d+)\.(proj|up|node)_(\d+)\.(.+)$")
HRNET_MARKERS = ("last_layer.3.weight", "stage4.0.fuse_layers.0.1.0.weight")
OCR_MARKERS = ("cls_head.weight", "ocr_distri_head.object_context_block.f_pixel.0.weight")
OCR_BLOCK = "ocr_distri_head.object_context_block."
# Official OCR head prefixes -> segtrain's (HRNetOCR); the longest official prefix that matches wins.
OCR_HEAD_PREFIXES = {
    "conv3x3_ocr.": "pixels.",
    "aux_head.": "aux_head.",
    "cls_head.": "classifier.",
    "ocr_distri_head.conv_bn_dropout.0.": "fuse.0.0.",
    "ocr_distri_head.conv_bn_dropout.1.0.": "fuse.0.1.",
    **{f"{OCR_BLOCK}{official}.{index}.": f"attention.{ours}.{place}."
       for official, ours in (("f_pixel", "query"), ("f_object", "key"))
       for index, place in (("0", "0.0"), ("1.0", "0.1"), ("2", "1.0"), ("3.0", "1.1"))},
    **{f"{OCR_BLOCK}{official}.{index}.": f"attention.{ours}.{place}."
       for official, ours in (("f_down", "value"), ("f_up", "project"))
       for index, place in (("0", "0"), ("1.0", "1"))},
}


def _is_drnseg(state: State) -> bool:
    return "seg.weight" in state and any(k.startswith("base.") for k in state)


def _is_dla_up(state: State) -> bool:
    return "fc.0.weight" in state and any(IDA_KEY.match(k) for k in state)


def _strip_fullmodel(state: State) -> State:
    """HRNet's train.py saves FullModel(model, loss): the network under `model.`."""
    if any(k.startswith("model.") for k in state) and all(k.startswith(("model.", "loss.")) for k in state):
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def _is_hrnet(state: State) -> bool:
    return all(k in _strip_fullmodel(state) for k in HRNET_MARKERS)


def _is_hrnet_ocr(state: State) -> bool:
    return all(k in _strip_fullmodel(state) for k in OCR_MARKERS)


def _hrnet_ocr_keys(state: State, backbone: nn.Module) -> State:
    mapped: State = {}
    prefixes = sorted(OCR_HEAD_PREFIXES, key=len, reverse=True)
    for key, value in _strip_fullmodel(state).items():
        official = next((p for p in prefixes if key.startswith(p)), None)
        if official is None:
            mapped["backbone.net." + key] = value
        else:
            mapped[OCR_HEAD_PREFIXES[official] + key.removeprefix(official)] = value
    return mapped


def _drn_children(backbone: nn.Module) -> tuple[str, ...]:
    arch = getattr(backbone, "arch", None)
    if arch not in ("C", "D"):
        raise WeightsError("holds an official DRNSeg model (fyu/drn), whose backbone is a DRN: use "
                           "backbone=drn_c_26 ... drn_d_105")
    return DRN_C_CHILDREN if arch == "C" else DRN_D_CHILDREN


def _drnseg_keys(state: State, backbone: nn.Module) -> State:
    children = _drn_children(backbone)
    mapped: State = {}
    for key, value in state.items():
        if key.startswith("base."):
            index, _, rest = key.removeprefix("base.").partition(".")
            name = children[int(index)] if index.isdigit() and int(index) < len(children) else f"base.{index}"
            mapped[f"backbone.{name}.{rest}"] = value
        else:
            mapped[_seg_head_key(key, "seg.")] = value
    return mapped


def _seg_head_key(key: str, classifier_prefix: str) -> str:
    """DRNSeg's and DLA-Up's shared head layout: a classifier under `classifier_prefix`, `up` the x-fold
    bilinear transposed conv; any other key is left as it is."""
    if key.startswith(classifier_prefix):
        return "classifier." + key.removeprefix(classifier_prefix)
    return "upsample.weight" if key == "up.weight" else key


def _unused_dla_project(key: str, backbone: nn.Module) -> bool:
    """An official Tree's `project` that timm's DLA (computing the same function) does not have."""
    match = re.match(r"^((?:level\d)(?:\.tree[12])*)\.project\.", key)
    if match is None:
        return False
    net = getattr(backbone, "net", None)
    try:
        tree = net.get_submodule(match.group(1)) if net is not None else None
    except AttributeError:
        return False
    return tree is not None and isinstance(getattr(tree, "project", None), nn.Identity)


def _dla_up_keys(state: State, backbone: nn.Module) -> State:
    mapped: State = {}
    for key, value in state.items():
        ida = IDA_KEY.match(key)
        if key.startswith("base."):
            inner = key.removeprefix("base.")
            if inner.startswith("fc.") or _unused_dla_project(inner, backbone):
                continue  # the ImageNet classifier; projections the official forward never uses
            mapped["backbone.net." + inner] = value
        elif ida is not None:
            stage, kind, index, rest = ida.groups()
            if kind == "node":
                mapped[f"decoder.stages.{stage}.nodes.{int(index) - 1}.{rest}"] = value
            else:
                part = "project" if kind == "proj" else "upsample"
                mapped[f"decoder.stages.{stage}.{part}.{index}.{rest}"] = value
        else:
            mapped[_seg_head_key(key, "fc.0.")] = value
    return mapped


def _hrnet_keys(state: State, backbone: nn.Module) -> State:
    state = _strip_fullmodel(state)
    mapped: State = {}
    heads = {"last_layer.0.weight": "fuse.0.weight", "last_layer.3.weight": "classifier.weight",
             "last_layer.3.bias": "classifier.bias"}
    for key, value in state.items():
        if key in heads:
            mapped[heads[key]] = value
        elif key.startswith("last_layer.1."):
            mapped["fuse.1." + key.removeprefix("last_layer.1.")] = value
        elif key != "last_layer.0.bias":
            mapped["backbone.net." + key] = value
    bias, mean = state.get("last_layer.0.bias"), mapped.get("fuse.1.running_mean")
    if bias is not None and mean is not None and bias.shape == mean.shape:
        # BN(conv(x) + b) with running mean m is BN(conv(x)) with running mean m - b.
        mapped["fuse.1.running_mean"] = mean - bias.to(mean.dtype)
    elif bias is not None:
        mapped["last_layer.0.bias"] = bias  # reported below as not fitting
    return mapped


@dataclass(frozen=True)
class OfficialLayout:
    name: str  # the code that writes it
    model_class: str  # the segtrain class in segtrain.models that takes it
    config: str  # the conf/model option building that class
    detect: Callable[[State], bool]
    translate: Callable[[State, nn.Module], State]  # (state, backbone) -> segtrain's keys


LAYOUTS = (
    OfficialLayout("DRNSeg (fyu/drn segment.py)", "drnseg.DRNSeg", "drnseg", _is_drnseg, _drnseg_keys),
    OfficialLayout("DLA-Up (ucbdrive/dla dla_up.py)", "dla_up.DLAUp", "dla_up", _is_dla_up, _dla_up_keys),
    OfficialLayout("HRNetV2 (HRNet-Semantic-Segmentation seg_hrnet.py)", "hrnet.HRNetV2", "hrnetv2", _is_hrnet,
                   _hrnet_keys),
    OfficialLayout("HRNetV2 + OCR (HRNet-Semantic-Segmentation seg_hrnet_ocr.py)", "hrnet_ocr.HRNetOCR",
                   "hrnet_ocr", _is_hrnet_ocr, _hrnet_ocr_keys),
)


def official_layout(state: State) -> OfficialLayout | None:
    """The official layout `state` has, or None (segtrain's own layout, a backbone file, anything else)."""
    if any(k.startswith("backbone.") for k in state):
        return None
    return next((layout for layout in LAYOUTS if layout.detect(state)), None)


def _model_class(layout: OfficialLayout) -> type:
    module, _, name = layout.model_class.rpartition(".")
    return getattr(importlib.import_module(f"segtrain.models.{module}"), name)


def _translate(layout: OfficialLayout, state: State, backbone: nn.Module, source: str) -> State:
    try:
        return layout.translate(state, backbone)
    except WeightsError as exc:
        raise WeightsError(f"{source} {exc}") from None


def _fit_report(mapped: State, own: State) -> tuple[list[str], list[str], list[str]]:
    # Files saved before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; load_state_dict fills it.
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
                  if k in own and own[k].shape != v.shape]
    return missing, unexpected, mismatched


def map_official_state_dict(model: nn.Module, state: State, source: str = "the checkpoint",
                            strict: bool = True) -> State:
    """`state` in segtrain's key layout when it is an official checkpoint of `model`'s family; else unchanged.

    `source` (the file) names the input in errors. An official file of another family is refused
    with a WeightsError. With `strict`, so is a recognised layout whose tensors do not fit `model`
    (another backbone depth, class count or down ratio), listing the keys, and the result loads with
    strict=True; `strict=False` only renames, for callers that match tensors themselves (`init_from`,
    which re-initialises classifiers of another class count).
    """
    layout = official_layout(state)
    if layout is None:
        return state
    if not isinstance(model, _model_class(layout)):
        raise WeightsError(f"{source} holds an official {layout.name} model; this model is "
                           f"{type(model).__name__}: build that family (model={layout.config})")
    mapped = _translate(layout, state, model.backbone, source)
    if not strict:
        return mapped
    missing, unexpected, mismatched = _fit_report(mapped, model.state_dict())
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{source} is an official {layout.name} checkpoint, but it does not fit this {type(model).__name__} "
            f"(check the backbone depth, the number of classes and the model options): missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatch {mismatched[:5]}"
        )
    return mapped


def official_backbone_state(backbone: nn.Module, state: State, source: str) -> State:
    """The backbone part of an official whole-model file, keyed as `backbone.state_dict()`; else `state`.

    For `backbone.weights=`: the heads of the file are left out (they belong to a model with its own
    class count), so a released Cityscapes model can start a backbone for another dataset.
    """
    layout = official_layout(state)
    if layout is None:
        return state
    mapped = _translate(layout, state, backbone, source)
    return {k.removeprefix("backbone."): v for k, v in mapped.items() if k.startswith("backbone.")}
