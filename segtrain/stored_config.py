"""The one reader of the config text stored in a checkpoint: untrusted data, parsed with limits.

segtrain stores a run's config resolved (`OmegaConf.to_yaml(cfg, resolve=True)`): plain values, no
anchors, no `${...}`. A checkpoint from elsewhere may hold anything, so the text is parsed as plain
YAML before OmegaConf sees it, with limits on its size and nesting; YAML aliases (each can multiply
the size of what it names: a few hundred bytes of nested aliases expand to gigabytes) and
interpolations (`${oc.env:API_KEY}` would read the environment, `${nope}` would fail much later) are
refused with one line naming the file and the key. What comes out is inert: OmegaConf never
resolves anything in it.
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError

MAX_TEXT_BYTES = 1 << 20  # segtrain's own stored configs are about 10 kB
MAX_DEPTH = 32  # segtrain's own are 5 deep


def _refuse(source: str, why: str) -> ConfigError:
    return ConfigError(f"the config stored in {source} {why}; segtrain never writes such a config: "
                       "use a checkpoint written by segtrain train")


def _check_events(text: str, source: str) -> None:
    """Aliases and nesting, from the parser's event stream: nothing is built before it passes."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise _refuse(source, f"uses a YAML alias (*{event.anchor})")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _refuse(source, f"is nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _interpolation(node: Any, path: str) -> str | None:
    """The first key whose value (or name) holds `${`, which OmegaConf would evaluate."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if "${" in str(key):
                return where
            found = _interpolation(value, where)
            if found:
                return found
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found = _interpolation(value, f"{path}[{n}]")
            if found:
                return found
    elif isinstance(node, str) and "${" in node:
        return path
    return None


def parse_stored_config(text: object, source: str) -> DictConfig:
    """The checkpoint's config text as an OmegaConf mapping holding plain values only."""
    if not isinstance(text, str):
        raise _refuse(source, f"is a {type(text).__name__}, not YAML text")
    if len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
        raise _refuse(source, f"is larger than {MAX_TEXT_BYTES // 1024} kB")
    try:
        _check_events(text, source)
        plain = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"the config stored in {source} is not valid YAML: {first}") from None
    if not isinstance(plain, dict):
        raise ConfigError(f"the config stored in {source} is not a mapping")
    key = _interpolation(plain, "")
    if key is not None:
        raise _refuse(source, f"holds an interpolation at {key} (a '${{...}}' value, never evaluated)")
    try:
        return OmegaConf.create(plain)
    except Exception as exc:  # noqa: BLE001 - keys or values OmegaConf cannot hold
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"the config stored in {source} cannot be read: {first}") from None
