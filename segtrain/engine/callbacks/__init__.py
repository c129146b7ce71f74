"""Callbacks of the training loop (segtrain.engine.callbacks.base explains the events).

segtrain's own behaviour around the step is a list of callbacks, in this order: the data check
(data.check_on_start: a sample of the files checked before the first step), the non-finite
guard (first, so nothing reports or saves a poisoned state), EMA, progress, validation with best.pt,
the experiment trackers of the `logger` group (conf/logger/; segtrain.engine.callbacks.tracker), the metric
writers, periodic checkpoints and preemption. A user's callbacks come from the config's `callbacks` mapping
(name -> `_target_` node) and run after them; conf/callbacks/ holds ready ones (callbacks=early_stopping):

    segtrain train '+callbacks.timer={_target_: my_project.TimerCallback, every: 100}'
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from segtrain.engine.callbacks.base import Callback, CallbackList
from segtrain.engine.callbacks.checkpointing import PeriodicCheckpoint
from segtrain.engine.callbacks.data_check import DataCheck
from segtrain.engine.callbacks.early_stopping import EarlyStopping
from segtrain.engine.callbacks.ema import EmaUpdate
from segtrain.engine.callbacks.metric_writers import MetricWriters
from segtrain.engine.callbacks.nonfinite import NonFiniteGuard
from segtrain.engine.callbacks.preemption import PreemptionStop
from segtrain.engine.callbacks.progress import ProgressLogger
from segtrain.engine.callbacks.tracker import Tracker
from segtrain.engine.callbacks.validation import ValidateAndKeepBest
from segtrain.errors import ConfigError
from segtrain.instantiate import instantiate_checked

__all__ = ["Callback", "CallbackList", "DataCheck", "EarlyStopping", "EmaUpdate", "MetricWriters", "NonFiniteGuard",
           "PeriodicCheckpoint", "PreemptionStop", "ProgressLogger", "Tracker", "ValidateAndKeepBest",
           "default_callbacks", "configured_callbacks", "configured_trackers"]


def default_callbacks(trackers: Sequence[Tracker] = ()) -> list[Callback]:
    """segtrain's own callbacks; the trackers start before the metric writers open the records."""
    return [DataCheck(), NonFiniteGuard(), EmaUpdate(), ProgressLogger(), ValidateAndKeepBest(), *trackers,
            MetricWriters(), PeriodicCheckpoint(), PreemptionStop()]


def configured_trackers(cfg: DictConfig, tensorboard: bool | None = None) -> list[Tracker]:
    """The config's `logger` mapping (conf/logger/: logger=[tensorboard,mlflow]), built in its order; a null entry
    is switched off, and so is tensorboard under logging.tensorboard=false (`tensorboard`: that setting when it
    is not cfg's, as eval's, which comes from the checkpoint)."""
    nodes = cfg.get("logger") or {}
    tensorboard = cfg.logging.tensorboard if tensorboard is None else tensorboard
    built = []
    for name, node in nodes.items():
        if node is None or (name == "tensorboard" and not tensorboard):
            continue
        section = f"logger.{name}"
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{section} must be a node with a _target_ naming a "
                              "segtrain.engine.callbacks.Tracker subclass (conf/logger/ has the trackers)")
        tracker = instantiate_checked(section, node)
        if not isinstance(tracker, Tracker):
            raise ConfigError(f"{section}._target_={node._target_!r} is not a segtrain.engine.callbacks.Tracker")
        tracker.key = section
        built.append(tracker)
    return built


def configured_callbacks(cfg: DictConfig) -> list[Callback]:
    """The config's `callbacks` mapping, built in its order; a null entry is switched off (so a
    config file's callback can be removed from the command line: `callbacks.NAME=null`)."""
    nodes = cfg.get("callbacks") or {}
    built = []
    for name, node in nodes.items():
        if node is None:
            continue
        section = f"callbacks.{name}"
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{section} must be a node with a _target_ naming a segtrain.engine.callbacks.Callback "
                              f"subclass, e.g. +{section}={{_target_: my_module.MyCallback}}")
        callback = instantiate_checked(section, node)
        if not isinstance(callback, Callback):
            raise ConfigError(f"{section}._target_={node._target_!r} is not a segtrain.engine.callbacks.Callback: "
                              "subclass it and override the events you need")
        built.append(callback)
    return built
