"""`init_from=CKPT`: start a new run from a checkpoint's model weights (mmsegmentation's `load_from`).

Only weights are taken: the optimizer, schedule, iteration and RNG start fresh. The file may be a
segtrain checkpoint (its EMA weights when it has them, else `model`) or a plain state dict,
optionally wrapped in `state_dict` or `model`, with or without DDP's `module.` prefix. Its tensors go
through `adapt_layout` (the one place a foreign key layout is translated) and are then matched to the
model by name:

- same name and shape: loaded;
- same name, differing only in the class dimension of a layer with `num_classes` outputs (the
  classifiers of the head and auxiliary head, a class-wise upsampler): re-initialised, i.e. kept as
  the new model built them;
- same name, any other shape difference: refused (another architecture);
- a model tensor the file lacks keeps its initialisation; a file tensor the model lacks is unused.

A file that matches fewer than half of the model's tensors is refused: it is not this model's.
The file is untrusted: read by segtrain.weights_file (tensors and plain types only), and a NaN or
infinity refuses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segtrain.config_checks import check_weights_path
from segtrain.errors import ConfigError, WeightsError
from segtrain.models.official import map_official_state_dict
from segtrain.weights_file import load_weights_file, nonfinite_tensor

log = logging.getLogger("segtrain.train")

# Below this share of the model's tensors matched by name, the file is not a checkpoint of this model.
MIN_MATCHED_SHARE = 0.5
NAMES_SHOWN = 8


@dataclass
class InitReport:
    """What `load_init_weights` did with each tensor (names as in the model's state dict)."""

    path: Path
    source: str  # which weights of the file: "segtrain checkpoint, its EMA weights", "state dict", ...
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # classifier tensors: another class count
    kept: list[str] = field(default_factory=list)  # model tensors the file lacks: their initialisation stays
    unused: list[str] = field(default_factory=list)  # file tensors the model lacks
    file_classes: int | None = None  # the class count of the file's classifier, when one was re-initialised
    class_names: list[str] | None = None  # a segtrain checkpoint's classes

    def summary(self) -> str:
        parts = [f"init_from={self.path}: {self.source}; loaded {len(self.loaded)} of "
                 f"{len(self.loaded) + len(self.reinitialised) + len(self.kept)} model tensors"]
        if self.reinitialised:
            parts.append(f"re-initialised {len(self.reinitialised)} for the class count ({self.file_classes} in "
                         f"the file): {_names(self.reinitialised)}")
        if self.kept:
            parts.append(f"{len(self.kept)} not in the file keep their initialisation: {_names(self.kept)}")
        if self.unused:
            parts.append(f"{len(self.unused)} tensors of the file unused: {_names(self.unused)}")
        return "; ".join(parts)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


def read_weights_file(path: Path) -> Any:
    """The unpickled file, tensors and plain types only: nothing in it can run code."""
    try:
        check_weights_path("init_from", path)
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    return load_weights_file(path, setting="init_from")


def _tensors(node: Any) -> dict[str, torch.Tensor]:
    if not isinstance(node, dict):
        return {}
    return {str(k): v for k, v in node.items() if isinstance(v, torch.Tensor)}


def extract_state(raw: Any, path: Path) -> tuple[dict[str, torch.Tensor], str, list[str] | None]:
    """(tensors by name, which weights of the file they are, a segtrain checkpoint's class names)."""
    if not isinstance(raw, dict):
        raise WeightsError(f"init_from={path}: holds a {type(raw).__name__}, not a checkpoint or state dict")
    class_names = raw.get("class_names")
    names = [str(n) for n in class_names] if isinstance(class_names, (list, tuple)) else None
    if "config" in raw and isinstance(raw.get("model"), dict):
        if isinstance(raw.get("ema"), dict) and _tensors(raw["ema"]):
            return _tensors(raw["ema"]), "segtrain checkpoint, its EMA weights", names
        return _tensors(raw["model"]), "segtrain checkpoint", names
    for key in ("state_dict", "model"):
        if isinstance(raw.get(key), dict) and _tensors(raw[key]):
            return _tensors(raw[key]), f"state dict (under '{key}')", names
    return _tensors(raw), "state dict", names


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """DDP and DataParallel save every name with `module.` in front."""
    if state and all(name.startswith(prefix) for name in state):
        return {name[len(prefix):]: tensor for name, tensor in state.items()}
    return state


def adapt_layout(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The one place a file's key layout is translated into the model's before matching by name.

    A segtrain or plain state dict of this model needs nothing; the whole-model files of the official
    DRNSeg / DLA-Up / HRNet releases are renamed by segtrain.models.official (renaming only: the class
    count is matched below, so an official 19-class Cityscapes model fine-tunes on other classes).
    """
    return map_official_state_dict(model, state, f"init_from={path}", strict=False)


def classifier_classes(model: nn.Module, name: str, target: torch.Tensor, given: torch.Tensor) -> int | None:
    """The file's class count if `name` is a class-count-dependent tensor and `given` differs from
    `target` in its class dimension only, else None.

    Class-count dependent: a weight or bias of a layer with `num_classes` outputs (the classifier of a
    head or auxiliary head, DRN/DLA-Up's class-wise upsampler), whose first dimension is the class.
    """
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None or target.dim() != given.dim() or target.dim() == 0:
        return None
    if target.shape[0] != num_classes or target.shape[1:] != given.shape[1:]:
        return None
    module_name, _, _ = name.rpartition(".")
    try:
        layer = model.get_submodule(module_name)
    except AttributeError:
        return None
    outputs = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    return int(given.shape[0]) if outputs == num_classes else None


def match_state(model: nn.Module, state: dict[str, torch.Tensor], report: InitReport) -> dict[str, torch.Tensor]:
    """The model's state dict with every loadable tensor of `state` in place; fills `report`."""
    merged = model.state_dict()
    for name, target in merged.items():
        given = state.get(name)
        if given is None:
            if not name.endswith("num_batches_tracked"):  # a counter, absent from files of old PyTorch versions
                report.kept.append(name)
        elif given.shape == target.shape:
            merged[name] = given
            report.loaded.append(name)
        elif (classes := classifier_classes(model, name, target, given)) is not None:
            report.reinitialised.append(name)
            report.file_classes = classes
        else:
            raise WeightsError(
                f"init_from={report.path}: {name} is {list(given.shape)} in the file but {list(target.shape)} in "
                "the model, a difference the class count does not explain: the file is another model or backbone "
                "(or width); configure the model and backbone it was trained with"
            )
    report.unused = sorted(set(state) - set(merged))
    return merged


def check_enough_matched(model_names: list[str], state: dict[str, torch.Tensor], report: InitReport) -> None:
    matched = len(report.loaded) + len(report.reinitialised)
    if matched >= MIN_MATCHED_SHARE * len(model_names) and report.loaded:
        return
    example_file = next(iter(sorted(state)), "(none)")
    raise WeightsError(
        f"init_from={report.path}: only {matched} of the model's {len(model_names)} tensors are in the file by name "
        f"({len(state)} tensors in it, e.g. '{example_file}'; the model has e.g. '{model_names[0]}'): it is not a "
        "checkpoint of this model and backbone; for ImageNet backbone weights use backbone.weights= instead"
    )


def load_init_weights(model: nn.Module, path: str | Path, class_names: list[str] | None = None) -> InitReport:
    """Load the model weights of `path` into `model` (in place) and say what was done with each tensor.

    `class_names`: the run's classes; a segtrain checkpoint of as many classes under other names is
    loaded as it is (its classifier is a starting point) and the log says so.
    """
    path = Path(path)
    raw = read_weights_file(path)
    state, source, file_names = extract_state(raw, path)
    if not state:
        raise WeightsError(f"init_from={path}: no tensors in it (keys: {sorted(map(str, raw))[:6]}); give a segtrain "
                           "checkpoint or a state dict saved with torch.save(model.state_dict(), ...)")
    bad = nonfinite_tensor(state)
    if bad is not None:
        raise WeightsError(f"init_from={path}: holds non-finite values (NaN or infinity) in {bad}; its weights are "
                           "unusable: take an earlier checkpoint")
    state = adapt_layout(model, strip_prefix(state), path)
    report = InitReport(path, source, class_names=file_names)
    merged = match_state(model, state, report)
    check_enough_matched(list(merged), state, report)
    model.load_state_dict(merged, strict=True)
    log.info("%s", report.summary())
    if class_names is not None and file_names is not None and not report.reinitialised and file_names != class_names:
        log.info("init_from: the checkpoint's classes %s are not the dataset's %s; the counts agree, so its "
                 "classifier is loaded as a starting point", file_names[:6], class_names[:6])
    return report
