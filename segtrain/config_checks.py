"""The values of a composed config: ranges, fixed sets of options and combinations, checked once.

Every command runs `check_config` right after Hydra composes its config (segtrain.cli, and the
tests' compose helper), so a bad value fails before any run directory, model or data loader exists,
with one line naming the key, the value and what to give instead. The engine then reads the values
as valid and never checks them again: the option keys YAML may read as booleans (`trainer.amp=off`,
`trainer.sync_bn=true`) are rewritten here to canonical lowercase strings.

The schema (segtrain.config) already refuses unknown keys and values of the wrong type; the
arguments of `_target_` nodes are matched against their function's signature by segtrain.instantiate.
"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError

AMP_MODES = ("auto", "off", "bf16", "fp16")
SYNC_BN_MODES = ("auto", "true", "false")
CHANNELS_LAST_MODES = ("auto", "true", "false")
# trainer.compile: off, the whole training network as one graph, or per block (segtrain.engine.compile). A YAML
# true (the key was a boolean before the modes) means COMPILE_DEFAULT, false means off.
COMPILE_MODES = ("off", "model", "regions")
COMPILE_DEFAULT = "model"

AT_LEAST_ONE = ("max_iters", "batch_size", "grad_accum_steps", "val_interval", "ckpt_interval", "keep_last")


def _normalised(value: Any) -> str:
    # YAML 1.1 reads bare off/on/true/false as booleans (a str field holds them as "False"); the options mean words.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).lower()


def option(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` of the option `key` as one of `choices` (a YAML false is "false", or "off" where that is a choice)."""
    mode = _normalised(value)
    if mode == "false" and "off" in choices:
        mode = "off"
    if mode not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return mode


def amp_mode(value: Any) -> str:
    return option("trainer.amp", value, AMP_MODES)


def compile_mode(value: Any) -> str:
    mode = _normalised(value)
    return option("trainer.compile", COMPILE_DEFAULT if mode == "true" else value, COMPILE_MODES)


def sync_bn_mode(value: Any) -> str:
    return option("trainer.sync_bn", value, SYNC_BN_MODES)


def _section(cfg: DictConfig, key: str) -> DictConfig | None:
    """A mapping section of the config, or None where the command has none (or it is left unset)."""
    if key not in cfg or OmegaConf.is_missing(cfg, key):
        return None
    node = cfg[key]
    return node if isinstance(node, DictConfig) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_num_workers(trainer: DictConfig) -> None:
    """trainer.num_workers: auto (canonical lowercase) or a whole number >= 0 (an int, also when given as "4")."""
    value = trainer.num_workers
    if isinstance(value, str) and value.lower() == "auto":
        trainer.num_workers = "auto"
        return
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"trainer.num_workers must be auto (the dataset's dataset.workers_per_gpu, capped by the "
                          f"CPUs) or a whole number >= 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"trainer.num_workers must be >= 0, got {value}")
    trainer.num_workers = value


def _check_trainer(cfg: DictConfig, trainer: DictConfig) -> None:
    trainer.amp = amp_mode(trainer.amp)
    trainer.sync_bn = sync_bn_mode(trainer.sync_bn)
    trainer.channels_last = option("trainer.channels_last", trainer.channels_last, CHANNELS_LAST_MODES)
    trainer.compile = compile_mode(trainer.compile)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(trainer.device)):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {trainer.device!r}")
    for key in AT_LEAST_ONE:
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {trainer[key]}")
    _check_num_workers(trainer)
    at_least_zero = [("trainer.seed", trainer.seed), ("trainer.max_skipped_steps", trainer.max_skipped_steps)]
    evaluation = _section(cfg, "eval")
    if evaluation is not None:
        at_least_zero.append(("eval.num_workers", evaluation.num_workers))
    dataset = _section(cfg, "dataset")
    if dataset is not None and "workers_per_gpu" in dataset:
        at_least_zero.append(("dataset.workers_per_gpu", dataset.workers_per_gpu))
    for key, value in at_least_zero:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    val_max_images = trainer.get("val_max_images")
    if val_max_images is not None and val_max_images < 1:
        raise ConfigError(f"trainer.val_max_images must be >= 1 (null: the whole validation split), got "
                          f"{val_max_images}")
    decay = trainer.get("ema_decay")
    if decay is not None and decay != 0 and not (_is_number(decay) and 0 < decay < 1):
        raise ConfigError(f"trainer.ema_decay must be in [0, 1) (0 or null: off; e.g. 0.999), got {decay!r}")
    clip = trainer.get("clip_grad_norm")
    if clip is not None and not (_is_number(clip) and clip > 0):
        raise ConfigError(f"trainer.clip_grad_norm must be a positive number (null: off; e.g. 1.0), got {clip!r}")


def _positive_pair(key: str, value: Any) -> None:
    values = [value] * 2 if isinstance(value, int) else list(value) if OmegaConf.is_list(value) else None
    if values is None or len(values) != 2 or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ConfigError(f"{key} must be [H, W] of positive integers, got {value}")


def _check_eval(evaluation: DictConfig) -> None:
    """The protocol (segtrain.engine.inference reads these as valid)."""
    for key in ("crop_size", "stride"):
        if evaluation[key] is not None:
            _positive_pair(f"eval.{key}", evaluation[key])
    scales = list(evaluation.scales)
    if not scales or not all(_is_number(v) and v > 0 for v in scales):
        raise ConfigError(f"eval.scales must be positive numbers, got {scales}")
    if evaluation.flip not in (True, False, "whole", "per_window"):
        raise ConfigError(f"eval.flip must be false, true (= whole) or per_window, got {evaluation.flip!r}")
    option("eval.average", evaluation.average, ("logits", "probs"))
    option("eval.pad", evaluation.pad, ("end", "centred"))
    long_side = evaluation.resize_long_side
    if long_side is not None and (isinstance(long_side, bool) or not isinstance(long_side, int) or long_side < 8):
        raise ConfigError(f"eval.resize_long_side must be a whole number of pixels >= 8, or null; got {long_side!r}")


def _check_logging(logging: DictConfig) -> None:
    for key in ("interval", "image_interval"):
        if logging[key] < 1:
            raise ConfigError(f"logging.{key} must be >= 1, got {logging[key]}")


def _check_optimizer(optimizer: DictConfig) -> float:
    """The optimizer's values; returns optimizer.lr, the schedule's base rate."""
    lr = optimizer.get("lr")
    if not _is_number(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a finite number > 0, got {lr!r}")
    head_lr_mult = optimizer.get("head_lr_mult", 1.0)
    if not _is_number(head_lr_mult) or head_lr_mult < 0:
        raise ConfigError(f"optimizer.head_lr_mult must be >= 0, got {head_lr_mult}")
    if "momentum" in optimizer:
        momentum = optimizer.momentum
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1) (e.g. 0.9), got {momentum!r}: at 1 or above "
                              "the update never forgets a gradient and training diverges")
    return float(lr)


def _check_schedule(schedule: DictConfig, base_lr: float | None) -> None:
    """The keys of segtrain's schedules (segtrain.engine.schedules), where the node has them."""
    if "min_lr" in schedule:
        min_lr = schedule.min_lr
        if not _is_number(min_lr) or min_lr < 0 or (base_lr is not None and min_lr > base_lr):
            raise ConfigError(f"schedule.min_lr must be in [0, optimizer.lr={base_lr}], got {min_lr}: the rate "
                              "would rise or turn negative")
    if "power" in schedule and not (_is_number(schedule.power) and schedule.power >= 0):
        raise ConfigError(f"schedule.power must be >= 0, got {schedule.power}")
    if "warmup_iters" in schedule and not (_is_number(schedule.warmup_iters) and schedule.warmup_iters >= 0):
        raise ConfigError(f"schedule.warmup_iters must be >= 0 (0: no warmup), got {schedule.warmup_iters}")
    if "warmup_ratio" in schedule and not (_is_number(schedule.warmup_ratio) and 0 <= schedule.warmup_ratio <= 1):
        raise ConfigError(f"schedule.warmup_ratio must be in [0, 1] (the first warmup rate as a fraction of "
                          f"optimizer.lr), got {schedule.warmup_ratio}")


def _check_bench(bench: DictConfig) -> None:
    if bench.batch_size < 2 or bench.steps < 1 or bench.warmup < 0:
        raise ConfigError("bench.batch_size must be >= 2 (BatchNorm), bench.steps >= 1, bench.warmup >= 0")


def _check_start(cfg: DictConfig) -> None:
    """train: resume= and init_from= are two ways to start; one at a time."""
    init_from, resume = cfg.get("init_from"), cfg.get("resume")
    if init_from not in (None, "") and resume not in (None, "", False, "auto"):
        raise ConfigError(f"init_from={init_from} and resume={resume}: give one. resume= continues a run "
                          "(weights, optimizer, iteration); init_from= starts a new run from a checkpoint's weights")


def _check_class_names(cfg: DictConfig) -> None:
    """A dataset whose config leaves class_names unset (dataset=folder): its masks cannot say how many classes
    there are, and a guess would train on the wrong count. Commands reading a checkpoint take its names."""
    dataset = _section(cfg, "dataset")
    if dataset is None or not OmegaConf.is_missing(dataset, "class_names"):
        return
    if "ckpt" in cfg and (OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt is not None):
        return
    raise ConfigError(f"dataset.class_names is not set (dataset={dataset.get('name')}): name every class, the one "
                      "of mask value 0 first, e.g. dataset.class_names=[background,crack]; the position of a name "
                      "is its class index (the mask value)")


def _check_flip_pairs(cfg: DictConfig) -> None:
    """dataset.flip_pairs: pairs of two different class indices, each class in one pair at most."""
    dataset = _section(cfg, "dataset")
    pairs = dataset.get("flip_pairs") if dataset is not None else None
    if not pairs:
        return
    count = None if OmegaConf.is_missing(dataset, "class_names") else len(dataset.class_names)
    seen: set[int] = set()
    for pair in pairs:
        values = list(pair) if OmegaConf.is_list(pair) or isinstance(pair, (list, tuple)) else [pair]
        if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values) \
                or values[0] == values[1] or min(values) < 0 or (count is not None and max(values) >= count):
            raise ConfigError(f"dataset.flip_pairs: {list(values)} is not a pair of two different class indices "
                              f"(0..{(count or 1) - 1}); give e.g. [[14,15],[16,17]] (left, right), or [] for none")
        if seen & set(values):
            raise ConfigError(f"dataset.flip_pairs: class {sorted(seen & set(values))[0]} is in two pairs; "
                              "each class swaps with one other class at most")
        seen |= set(values)


def check_config(cfg: DictConfig) -> None:
    """Refuse a value out of range, outside its options, or in a contradictory combination (ConfigError,
    one line); rewrite trainer.amp, trainer.sync_bn, trainer.channels_last and trainer.compile to their canonical
    strings."""
    trainer = _section(cfg, "trainer")
    if trainer is not None:
        _check_trainer(cfg, trainer)
    optimizer = _section(cfg, "optimizer")
    base_lr = _check_optimizer(optimizer) if optimizer is not None else None
    schedule = _section(cfg, "schedule")
    if schedule is not None:
        _check_schedule(schedule, base_lr)
    for key, check in (("eval", _check_eval), ("logging", _check_logging), ("bench", _check_bench)):
        section = _section(cfg, key)
        if section is not None:
            check(section)
    _check_start(cfg)
    _check_class_names(cfg)
    _check_flip_pairs(cfg)
