"""Building objects from `_target_` config nodes, with the node's keys checked against the signature.

Adding a model, backbone or dataset source is one function or class in code and one file in conf/;
a misspelt key names itself instead of surfacing as a TypeError deep inside the constructor.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
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
    section: str, node: DictConfig | dict, drop: tuple[str, ...] = (), partial: bool = False,
    supplied: tuple[str, ...] = (), **extra: Any
) -> Any:
    """Call node._target_ with the node's keys (minus `drop`, plus `extra`); unknown keys raise.

    `partial=True` (optimizers, schedules): the node must say `_partial_: true`, and the call with
    the node's keys bound is returned (functools.partial) for the caller to complete with the
    arguments named in `supplied`. Keys the caller supplies (`extra`, `supplied`) may not be set in
    the config. A constructor's own refusal of a value (TypeError, ValueError) is a ConfigError.
    """
    if node is None:
        raise ConfigError(f"{section} is missing: choose one of the conf/{section}/ options ({section}=NAME)")
    kwargs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cls = _resolve_target(section, kwargs)
    kwargs.pop("_target_")
    if bool(kwargs.pop("_partial_", False)) != partial:
        raise ConfigError(f"{section}._partial_ must be {str(partial).lower()}: segtrain "
                          + ("completes the call itself" if partial else "builds this section in one call"))
    for key in drop:
        kwargs.pop(key, None)
    given_by_segtrain = set(extra) | set(supplied)
    for key in sorted(given_by_segtrain & set(kwargs)):
        raise ConfigError(f"{section}.{key} is set by segtrain itself; remove it from the config")
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(k for k in params if k not in given_by_segtrain and k != "self")
            raise ConfigError(
                f"unknown key {section}.{unknown[0]} for {cls.__name__}; allowed keys: {allowed}"
            )
    if partial:
        return checked_call(section, functools.partial(cls, **kwargs, **extra))
    return checked_call(section, cls)(**kwargs, **extra)


def checked_call(section: str, function: Any) -> Any:
    """`function`, with the TypeError / ValueError a constructor raises for a bad value turned into a
    one-line ConfigError naming the section (segtrain's own ConfigErrors pass through)."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (TypeError, ValueError, IndexError) as exc:
            name = getattr(function, "__name__", None) or getattr(getattr(function, "func", None), "__name__", "")
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{section}: {name} refused the configured values: {first}") from None

    return call


# Sections rebuilt from a checkpoint's config (eval, predict, export); their conf/ groups name every
# class and function a checkpoint's config may point at.
REBUILT_SECTIONS = ("model", "backbone", "dataset")


def _yaml_targets(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {str(node["_target_"])} if "_target_" in node else set()
        for value in node.values():
            found |= _yaml_targets(value)
        return found
    if isinstance(node, list):
        return set().union(*(_yaml_targets(value) for value in node)) if node else set()
    return set()


@functools.lru_cache(maxsize=4)
def shipped_targets(conf: Path) -> frozenset[str]:
    """Every `_target_` of conf/'s model, backbone and dataset options: segtrain's own models,
    backbones and dataset sources, named one by one (a package prefix would let a checkpoint call any
    function of the package, such as a downloader)."""
    import yaml

    found: set[str] = set()
    for group in REBUILT_SECTIONS:
        for path in sorted((conf / group).glob("*.yaml")):
            found |= _yaml_targets(yaml.safe_load(path.read_text()))
    return frozenset(found)


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
    """Refuse any `_target_` of a stored config that is not one of segtrain's own (`shipped_targets`),
    before importing it.

    `trusted_keys` are the keys the user set on the command line (trusted, as their own YAML files
    are): a `_target_` key itself or a section that contains it. The message says how to trust a
    target deliberately.
    """
    from segtrain.config import config_dir

    shipped = shipped_targets(config_dir())
    for section in REBUILT_SECTIONS:
        for key, target in _targets(stored.get(section), section):
            parents = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
            if key in trusted_keys or parents & trusted_keys or target in shipped:
                continue
            raise ConfigError(
                f"refusing {key}={target!r} from the config stored in {source}: a checkpoint's config may only "
                f"name segtrain's own models, backbones and dataset sources. If you trust this code, "
                f"pass {key}={target} on the command line"
            )
