"""Every key a user gives is read or refused, with one line naming it.

The keys a command knows are those of its composed defaults: the typed sections' fields
(segtrain.config), the top-level keys of the primary config, and, under a `_target_` node, the
arguments of the function or class it names. A key added with `+` must be one of those arguments
(the node lists only some); anywhere else nothing would read it. A misspelt key is answered with
the closest known key, never with a suggestion to add it.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError

# Sections only training reads; the trainer keys inference does read (eval, predict, export, info).
TRAINING_ONLY = ("loss", "optimizer", "schedule", "callbacks", "debug", "logger")
INFERENCE_TRAINER_KEYS = ("trainer.device", "trainer.amp")
# Training sections eval reads too: the experiment trackers it records its scores to.
EVAL_READS = ("logger",)


def given_keys(overrides: list[str]) -> set[str]:
    """The keys (or groups) a list of Hydra overrides sets: `+a.b=1`, `~c`, `model=x` -> a.b, c, model."""
    return {text.split("=", 1)[0].lstrip("+~") for text in overrides}


def config_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a config, sections included (lists are values, not entered)."""
    keys: set[str] = set()
    if isinstance(node, DictConfig):
        for key in node.keys():
            where = f"{prefix}.{key}" if prefix else str(key)
            keys.add(where)
            keys |= config_keys(node._get_node(key), where)
    return keys


def _parameters(node: DictConfig) -> tuple[str, dict[str, inspect.Parameter]]:
    """Name and signature parameters of the function or class a `_target_` node names."""
    from segtrain.instantiate import _resolve_target

    target = _resolve_target("", {"_target_": node.get("_target_")})
    try:
        return getattr(target, "__name__", str(target)), dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # no signature to read: accept, the call itself will judge
        return str(target), {}


def _target_ancestor(cfg: DictConfig, parts: list[str]) -> tuple[int, DictConfig | None, bool]:
    """(depth of the nearest `_target_` node above the key, that node, whether the key exists)."""
    node: Any = cfg
    found: tuple[int, DictConfig | None] = (0, None)
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and "_target_" in node:
            found = (depth, node)
        if not isinstance(node, DictConfig) or part not in node:
            return found[0], found[1], False
        node = node._get_node(part)
    return found[0], found[1], True


def known_keys(cfg: DictConfig) -> set[str]:
    """The config's keys plus, under each `_target_` node, the arguments its target takes."""
    keys = config_keys(cfg)
    for key in list(keys):
        if key.endswith("._target_"):
            section = key[: -len("._target_")]
            try:
                _, params = _parameters(OmegaConf.select(cfg, section))
            except ConfigError:
                continue
            keys |= {f"{section}.{name}" for name, p in params.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"}
    return keys


def closest_key(key: str, known: set[str]) -> str | None:
    """The known key most like `key` (a misspelling), or None when none is close."""
    leaf_parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == leaf_parent]
    extended = sorted(k for k in siblings if k.startswith(f"{key}_"))  # trainer.ema -> trainer.ema_decay
    if extended:
        return extended[0]
    for candidates in (siblings, sorted(known)):
        match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def unknown_key_message(key: str, known: set[str], hint: str = "") -> str:
    match = closest_key(key, known)
    text = f"unknown config key '{key}'"
    if match:
        return f"{text}; did you mean '{match}'?{hint}"
    top = key.split(".")[0]
    near = sorted(k for k in known if k.startswith(f"{top}.") and k.count(".") == 1)
    where = f"; {top} has: {', '.join(k.split('.', 1)[1] for k in near)}" if near else ""
    return f"{text}{where}{hint}"


def check_added_key(key: str, cfg: DictConfig) -> None:
    """A key added with `+` (absent from `cfg`, the config composed without it) must be an argument
    that a `_target_` node above it passes to its function or class; anything else is unread."""
    parts = key.split(".")
    if parts[0] in ("callbacks", "logger") and len(parts) > 1:
        return  # a callback or tracker node the user adds: its keys are checked against its class when built
    depth, node, exists = _target_ancestor(cfg, parts)
    if exists:
        return  # Hydra itself refuses to add a key that is already there
    if node is not None and depth < len(parts):
        name, params = _parameters(node)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if takes_any or not params or parts[depth] in params:
            return
        section = ".".join(parts[:depth])
        raise ConfigError(unknown_key_message(key, known_keys(cfg), f" ({section} builds {name}, which takes no "
                                              f"argument '{parts[depth]}')"))
    raise ConfigError(unknown_key_message(key, known_keys(cfg), " (nothing reads a key added with +)"))


# Commands that run no evaluation: the evaluation protocol and its eval.* keys do nothing there.
NOT_EVALUATING = ("export", "info")


def check_effective(key: str, command: str = "eval") -> None:
    """eval, predict, export and info read the model, dataset, eval.*, data.* and a few trainer keys;
    a training-only key given to them is refused, and so is an evaluation key given to export or info."""
    section = key.split(".")[0]
    if section in EVAL_READS:
        if command == "eval":
            return
        raise ConfigError(f"{key} has no effect on {command}: only train and eval record to the trackers of logger")
    if command in NOT_EVALUATING and section in ("protocol", "eval"):
        raise ConfigError(f"{key} has no effect on {command}, which evaluates nothing; evaluation protocols "
                          "and eval.* keys apply to segtrain eval and segtrain predict")
    if section in TRAINING_ONLY or (section == "trainer" and key not in INFERENCE_TRAINER_KEYS):
        raise ConfigError(f"{key} has no effect here: eval, predict, export and info only read the model, "
                          f"backbone, dataset, eval.*, data.* and {', '.join(INFERENCE_TRAINER_KEYS)}")
