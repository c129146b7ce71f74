"""A checkpoint back to a network: its stored config with the command line applied, and the model
with its trained weights (eval, predict, export and info start here).

The stored config is untrusted: its `_target_`s are checked before anything is imported, and the
network (model and backbone) stays the checkpoint's; the command line may change everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain.config import CommonConfig
from segtrain.config_checks import check_class_name_values
from segtrain.engine.checkpoint import inference_checkpoint, load_checkpoint
from segtrain.engine.ema import inference_weights
from segtrain.engine.resume import NOT_ARCHITECTURE, stored_config
from segtrain.engine.runtime import resolve_device
from segtrain.errors import ConfigError, WeightsError
from segtrain.instantiate import check_stored_targets
from segtrain.keys import check_effective
from segtrain.models import backbone_for_inference, build_model

GROUPS = ("model", "backbone", "dataset", "loss", "optimizer", "schedule")
# The eval keys a protocol (conf/protocol/) sets: `protocol=NAME` replaces these in the checkpoint's config.
PROTOCOL_KEYS = ("mode", "crop_size", "stride", "scales", "flip", "output_stride", "average", "pad",
                 "resize_long_side")
# Keys of the command's own config, never taken from (or written into) the training config.
# `logger`: eval's trackers come from the command line only (a checkpoint's config is untrusted).
COMMAND_KEYS = ("ckpt", "input", "output", "format", "predict", "export", "resume", "init_from", "info", "logger")


def trained_network(stored: DictConfig) -> str:
    """`model DeepLabV3Plus + backbone resnet101`: what a stored config's network is, in words."""
    def name(node: object) -> str:
        if not isinstance(node, DictConfig):
            return "?"
        return str(node.get("name") or str(node.get("_target_", "?")).rsplit(".", 1)[-1])

    model = stored.get("model")
    model_name = str(model.get("_target_", "?")).rsplit(".", 1)[-1] if isinstance(model, DictConfig) else "?"
    return f"model {model_name} + backbone {name(stored.get('backbone'))}"


def _architecture(node: object) -> object:
    if not isinstance(node, DictConfig):
        return node
    plain = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in plain.items() if k not in NOT_ARCHITECTURE}


def refuse_network_change(stored: DictConfig, composed: DictConfig, group: str, choice: str, source: str) -> None:
    """The network is the checkpoint's: `model=`/`backbone=` may only name what it was trained with."""
    if _architecture(composed.get(group)) != _architecture(stored.get(group)):
        raise ConfigError(f"{group}={choice}: {source} was trained with {trained_network(stored)}; the network comes "
                          f"from the checkpoint, so drop {group}= (eval.output_stride=8 changes the output stride)")


def apply_overrides(stored: DictConfig, composed: DictConfig, overrides: list[str],
                    source: str = "the checkpoint") -> DictConfig:
    """Apply the command line's overrides (already validated and typed in `composed`) to `stored`.

    A group choice (`dataset=voc`) replaces the whole section; a key (`dataset.root=...`) replaces
    one value. Everything else stays as it was when the checkpoint was trained.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if key.split(".")[0] in (*COMMAND_KEYS, "hydra") or override.is_delete():
            continue
        if key == "experiment":
            raise ConfigError("experiment= cannot be changed at evaluation; override single keys instead")
        check_effective(key)
        if key == "protocol":  # its values are in composed.eval, with the eval.* keys of the command line on top
            for name in PROTOCOL_KEYS:
                OmegaConf.update(stored, f"eval.{name}", composed.eval[name], merge=False, force_add=True)
        elif key in ("model", "backbone"):
            refuse_network_change(stored, composed, key, text.split("=", 1)[1], source)
        elif key in GROUPS:
            stored[key] = composed[key]
        else:
            OmegaConf.update(stored, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return stored


def trusted_target_keys(overrides: list[str]) -> set[str]:
    """Keys the command line sets: a group choice (`dataset=folder`) replaces its whole section."""
    return {text.split("=", 1)[0].lstrip("+~") for text in overrides}


def checkpoint_config(state: dict, composed: DictConfig, overrides: list[str], source: str = "the checkpoint"
                      ) -> DictConfig:
    stored = stored_config(state, source)
    check_stored_targets(OmegaConf.to_container(stored, resolve=False), source, trusted_target_keys(overrides))
    # The training command's own top-level keys (resume, ...) are not part of what inference rebuilds.
    shared = {f.name for f in fields(CommonConfig)}
    for key in [k for k in stored.keys() if k not in shared]:
        stored.pop(key)
    stored = apply_overrides(stored, composed, overrides, source)
    try:
        return OmegaConf.merge(OmegaConf.structured(CommonConfig), stored)
    except Exception as exc:  # noqa: BLE001 - OmegaConf validation errors
        raise ConfigError(f"the config stored in the checkpoint does not validate: {exc}") from None


def checkpoint_view(composed: DictConfig, overrides: list[str]) -> DictConfig:
    """What eval, predict, export and info run with (`--cfg job`): the checkpoint's config with the
    command line applied, plus the command's own keys (ckpt, input, output, ...)."""
    ckpt = inference_checkpoint(composed.ckpt)
    merged = checkpoint_config(load_checkpoint(ckpt), composed, overrides, str(ckpt))
    view = OmegaConf.to_container(merged, resolve=False)
    own = OmegaConf.to_container(composed, resolve=False)
    view.update({key: own[key] for key in COMMAND_KEYS if key in own})
    return OmegaConf.create(view)


@dataclass
class LoadedModel:
    cfg: DictConfig
    model: nn.Module
    state: dict
    device: torch.device
    class_names: list[str]
    path: Path  # the checkpoint file (ckpt= may name a run directory)


def load_for_inference(composed: DictConfig, overrides: list[str]) -> LoadedModel:
    """Checkpoint -> (config with the command line applied, model in eval mode on its device).

    `eval.output_stride` rebuilds a dilatable backbone at that stride before loading the weights
    (dilation changes no weight shape), e.g. a model trained at 16 evaluated at 8; the ASPP rates follow.
    """
    if OmegaConf.is_missing(composed, "ckpt"):
        raise ConfigError("ckpt is required: ckpt=outputs/<run>/checkpoints/best.pt (or the run directory)")
    ckpt = inference_checkpoint(composed.ckpt)
    state = load_checkpoint(ckpt)
    cfg = checkpoint_config(state, composed, overrides, str(ckpt))
    class_names = list(cfg.dataset.class_names)
    check_class_name_values(class_names, f"dataset.class_names of {ckpt}")  # a stranger's: one line, short names
    saved_names = list(state.get("class_names", class_names))
    if saved_names != class_names:
        if len(saved_names) != len(class_names):
            differ = f"predicts {len(saved_names)} classes but dataset '{cfg.dataset.name}' has {len(class_names)}"
        else:
            n = next(i for i, (a, b) in enumerate(zip(saved_names, class_names)) if a != b)
            differ = (f"names class {n} {str(saved_names[n])[:80]!r} but dataset '{cfg.dataset.name}' names it "
                      f"{str(class_names[n])[:80]!r}")
        raise ConfigError(f"{ckpt} {differ}; use the dataset the model was trained for")
    backbone_cfg = backbone_for_inference(cfg.backbone, cfg.eval.output_stride)
    device = resolve_device(cfg.trainer.device)
    model = build_model(cfg.model, backbone_cfg, len(class_names))
    try:
        model.load_state_dict(inference_weights(state, str(ckpt)))
    except RuntimeError as exc:  # e.g. a model.* override that changes a layer's shape
        changed = sorted(k for k in trusted_target_keys(overrides) if k.split(".")[0] in ("model", "backbone"))
        built = f" built with {', '.join(changed)}" if changed else ""
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise WeightsError(f"the weights in {ckpt} do not fit the network{built} (trained: {trained_network(cfg)}): "
                           f"{detail[min(1, len(detail) - 1)]}") from None
    model.to(device).eval()
    return LoadedModel(cfg, model, state, device, class_names, ckpt)
