"""Building objects from `_target_` config nodes, with the node's keys checked against the signature.

Adding a model, backbone or dataset source is one function or class in code and one file in conf/;
a misspelt key names itself instead of surfacing as a TypeError deep inside the constructor.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError


def _resolve_target(section: str, node: dict[str, Any]) -> Any:
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{section}._target_ is missing: it must name the class to build")
    module_name, _, attr = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{section}._target_={target!r} cannot be imported") from None


def instantiate_checked(
    section: str, node: DictConfig | dict, drop: tuple[str, ...] = (), **extra: Any
) -> Any:
    """Call node._target_ with the node's keys (minus `drop`, plus `extra`); unknown keys raise.

    With `_partial_: true` in the node, return the call with the node's keys bound instead
    (functools.partial), for the caller to complete: optimizers and schedules.
    """
    if node is None:
        raise ConfigError(f"{section} is missing: choose one of the conf/{section}/ options ({section}=NAME)")
    kwargs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cls = _resolve_target(section, kwargs)
    kwargs.pop("_target_")
    partial = bool(kwargs.pop("_partial_", False))
    for key in drop:
        kwargs.pop(key, None)
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(k for k in params if k not in extra and k != "self")
            raise ConfigError(
                f"unknown key {section}.{unknown[0]} for {cls.__name__}; allowed keys: {allowed}"
            )
    if partial:
        return functools.partial(cls, **kwargs, **extra)
    return cls(**kwargs, **extra)


# Where `_target_`s of a checkpoint's stored config may point: segtrain's own models, backbones,
# dataset sources and losses. A checkpoint is untrusted data; its config must not name code.
TRUSTED_TARGET_PREFIXES = ("segtrain.models.", "segtrain.data.", "segtrain.engine.losses.")
# Sections rebuilt from a checkpoint's config (eval, predict, export).
REBUILT_SECTIONS = ("model", "backbone", "dataset", "loss")


def _targets(node: Any, path: str) -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                found.append((where, str(value)))
            else:
                found.extend(_targets(value, where))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found.extend(_targets(value, f"{path}[{n}]"))
    return found


def check_stored_targets(stored: dict[str, Any], source: str, trusted_keys: set[str]) -> None:
    """Refuse any `_target_` of a stored config outside segtrain's packages, before importing it.

    `trusted_keys` are the keys the user set on the command line (trusted, as their own YAML files
    are): a `_target_` key itself or a section that contains it. The message says how to trust a
    target deliberately.
    """
    for section in REBUILT_SECTIONS:
        for key, target in _targets(stored.get(section), section):
            parents = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
            if key in trusted_keys or parents & trusted_keys or target.startswith(TRUSTED_TARGET_PREFIXES):
                continue
            raise ConfigError(
                f"refusing {key}={target!r} from the config stored in {source}: a checkpoint's config may only "
                f"name segtrain's own models, backbones, dataset sources and losses. If you trust this code, "
                f"pass {key}={target} on the command line"
            )
