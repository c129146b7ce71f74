"""What a resumed run may change, and what it may not.

A checkpoint continues the run that wrote it: the same model, backbone and training set. Those are
compared with the command's configuration and a difference is refused, naming what the checkpoint
holds. Everything else may change at resume (learning rate, weight decay, schedule, iterations,
batch size, ...): the new values apply from the resumed iteration, and each change is logged.
The stored config is untrusted data: it is parsed and compared, never instantiated.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError, WeightsError
from segtrain.stored_config import parse_stored_config

log = logging.getLogger("segtrain.train")

# Keys that do not change the network a checkpoint's weights belong to (mean/std: the input
# statistics, compared as the resolved normalisation by check_same_normalization).
NOT_ARCHITECTURE = {"pretrained", "weights", "mean", "std"}
# Sections whose changes take effect at resume and are logged.
CHANGEABLE = ("loss", "optimizer", "schedule", "trainer")


def stored_config(state: dict, source: str) -> DictConfig:
    """The config text of a checkpoint, parsed with limits into plain values (segtrain.stored_config):
    never resolved, never instantiated."""
    if "config" not in state:
        raise ConfigError(f"{source} holds no config: it was not written by segtrain train")
    return parse_stored_config(state["config"], source)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}.{key}"))
        return flat
    return {prefix: node}


def _constructor_defaults(node: DictConfig) -> dict[str, Any]:
    """Defaults of the configured (trusted) target, standing in for keys one side does not list."""
    from segtrain.instantiate import _resolve_target

    try:
        target = _resolve_target("", {"_target_": node.get("_target_")})
        parameters = inspect.signature(target).parameters.values()
    except (ConfigError, TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _comparable(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **{k: v for k, v in values.items() if k not in NOT_ARCHITECTURE}}
    for key in NOT_ARCHITECTURE:
        merged.pop(key, None)
    if "name" in merged:  # a pretrained tag names weights, not an architecture: resnet50.tv_in1k is resnet50
        merged["name"] = str(merged["name"]).split(".")[0]
    return {k: (None if v in ({}, [], ()) else v) for k, v in merged.items()}


def _resolve_auto(model: dict[str, Any], backbone: Any) -> dict[str, Any]:
    """DeepLab's `separable: auto` stands for what it resolves to with that side's backbone."""
    if model.get("separable") != "auto":
        return model
    from segtrain.models.deeplab import resolve_separable

    name = backbone.get("name") if isinstance(backbone, dict) else None
    return {**model, "separable": resolve_separable("auto", str(name or ""))}


def check_same_network(stored: DictConfig, cfg: DictConfig, source: str) -> None:
    """The model and backbone the weights belong to; keys a side leaves out count as their defaults."""
    for section in ("model", "backbone"):
        defaults = _constructor_defaults(cfg[section])
        saved = _comparable(_plain(stored.get(section)) or {}, defaults)
        current = _comparable(_plain(cfg[section]), defaults)
        if section == "model":
            saved = _resolve_auto(saved, _plain(stored.get("backbone")))
            current = _resolve_auto(current, _plain(cfg.backbone))
        differs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differs:
            raise ConfigError(
                f"{source} holds a different {section} ({section}.{differs[0]}: {saved.get(differs[0])!r} in the "
                f"checkpoint, {current.get(differs[0])!r} now); resume with the {section} it was trained with, or "
                "start a new run directory"
            )


def check_same_normalization(stored: DictConfig, cfg: DictConfig, source: str) -> None:
    """The input normalisation the weights were trained with (dataset.mean/std, else the backbone's)."""
    from segtrain.data.normalization import normalization

    saved, current = normalization(stored), normalization(cfg)
    if saved != current:
        raise ConfigError(
            f"{source} was trained on images normalised with mean {saved[0]}, std {saved[1]}; the configuration "
            f"gives mean {current[0]}, std {current[1]}: resume with dataset.mean={saved[0]} dataset.std={saved[1]}, "
            "or start a new run directory"
        )


def log_changes(stored: DictConfig, cfg: DictConfig, iteration: int) -> list[str]:
    """Log each value that differs from the checkpoint's config in the sections a resume may change."""
    changes = []
    for section in CHANGEABLE:
        saved = _flat(_plain(stored.get(section)) or {}, section)
        current = _flat(_plain(cfg[section]), section)
        for key in sorted(set(saved) | set(current)):
            if saved.get(key, "(unset)") != current.get(key, "(unset)"):
                changes.append(f"{key}: {saved.get(key, '(unset)')} -> {current.get(key, '(unset)')}")
    for change in changes:
        log.info("resume: %s (from iteration %d)", change, iteration + 1)
    return changes


def data_fingerprint(samples: Iterable[tuple], root: str | Path) -> dict[str, Any]:
    """The training set as its sorted file list relative to the dataset root (moving the root is fine)."""
    base = Path(root)
    names = []
    for image, mask, *_ in samples:
        names.append(f"{_relative(image, base)}\t{_relative(mask, base)}")
    names.sort()
    return {"count": len(names), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}


def _relative(path: str | Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def check_same_data(saved: dict | None, current: dict, source: str) -> None:
    """`saved`: the checkpoint's `data_fingerprint`; every training checkpoint records one."""
    if not isinstance(saved, dict):
        raise WeightsError(f"{source} cannot be resumed: it records no training set ('data_fingerprint'); start a "
                           f"new run directory, with init_from={source} to start from its weights")
    if saved == current:
        return
    raise ConfigError(
        f"{source} was trained on a different training set ({saved.get('count')} samples, fingerprint "
        f"{str(saved.get('sha256'))[:12]}) than the configured one ({current['count']} samples, "
        f"{current['sha256'][:12]}); resume continues a run on its own data: to train on this data, start a new run "
        f"directory, with init_from={source} to start from its weights"
    )
