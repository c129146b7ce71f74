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
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
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


# What of each file the fingerprint reads: its size, and its first and last bytes (a different image
# under the same name differs there). Two small reads per file keep it to seconds for 100k files, and
# unlike modification times it survives copying the dataset elsewhere.
SAMPLED_BYTES = 4096
DIGEST_BYTES = 8  # per file, in the checkpoint: names the changed file at resume


def sampled_digest(path: str | Path) -> bytes:
    """Size and first/last SAMPLED_BYTES of a file, hashed; a file that cannot be read digests as such."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(size.to_bytes(8, "little"))
            digest.update(handle.read(SAMPLED_BYTES))
            if size > SAMPLED_BYTES:
                digest.update(os.pread(handle.fileno(), SAMPLED_BYTES, max(SAMPLED_BYTES, size - SAMPLED_BYTES)))
    except (OSError, TypeError):
        digest.update(b"unreadable")
    return digest.digest()


def data_fingerprint(samples: Iterable[tuple], root: str | Path) -> dict[str, Any]:
    """The training set: its sorted file list relative to the dataset root (moving the root is fine) and
    each file's sampled content (`sampled_digest`), so other images under the same names are told apart.

    `files` holds one digest per file (image, then mask, in the order of the sorted names): a resume on
    changed data names the first file that differs."""
    base = Path(root)
    rows = sorted((f"{_relative(image, base)}\t{_relative(mask, base)}", image, mask) for image, mask, *_ in samples)
    names = [name for name, _, _ in rows]
    digests = b"".join(sampled_digest(image) + sampled_digest(mask) for _, image, mask in rows)
    return {"count": len(names), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "content_sha256": hashlib.sha256(digests).hexdigest(),
            "files": torch.frombuffer(bytearray(digests), dtype=torch.uint8).view(-1, 2, DIGEST_BYTES).clone(),
            "names": names}


def _relative(path: str | Path, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


def recorded_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores of a fingerprint: everything but the names (the count and hash stand for them)."""
    return {key: value for key, value in fingerprint.items() if key != "names"}


def same_data(saved: dict, current: dict) -> bool:
    """The same files by name, and by sampled content where the checkpoint records it (older ones do not)."""
    if saved.get("count") != current.get("count") or saved.get("sha256") != current.get("sha256"):
        return False
    return "content_sha256" not in saved or saved.get("content_sha256") == current.get("content_sha256")


def changed_file(saved: dict, current: dict) -> str | None:
    """The first file whose recorded digest differs (names equal), or None when the record does not say."""
    recorded, now = saved.get("files"), current.get("files")
    if not isinstance(recorded, torch.Tensor) or not isinstance(now, torch.Tensor) or recorded.shape != now.shape:
        return None
    differs = (recorded != now).any(dim=2).nonzero()
    if not len(differs):
        return None
    row, column = (int(v) for v in differs[0])
    return current["names"][row].split("\t")[column]


def check_same_data(saved: dict | None, current: dict, source: str) -> None:
    """`saved`: the checkpoint's `data_fingerprint`; every training checkpoint records one."""
    if not isinstance(saved, dict):
        raise WeightsError(f"{source} cannot be resumed: it records no training set ('data_fingerprint'); start a "
                           f"new run directory, with init_from={source} to start from its weights")
    if same_data(saved, current):
        return
    restart = (f"resume continues a run on its own data: to train on this data, start a new run directory, with "
               f"init_from={source} to start from its weights")
    if saved.get("sha256") == current["sha256"]:
        changed = changed_file(saved, current)
        what = f"{changed} changed" if changed else "some files changed"
        raise ConfigError(f"{source} was trained on other contents of the same {current['count']} files: {what} "
                          f"since (size or bytes differ from the checkpoint's record); {restart}")
    raise ConfigError(
        f"{source} was trained on a different training set ({saved.get('count')} samples, fingerprint "
        f"{str(saved.get('sha256'))[:12]}) than the configured one ({current['count']} samples, "
        f"{current['sha256'][:12]}); {restart}"
    )
