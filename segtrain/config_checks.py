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
from pathlib import Path
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
# Upper bounds where a typo would otherwise run (or allocate) for ever: a billion steps is months at 30 it/s.
MAX_ITERS = 10**9
# numpy's RandomState (dataset workers, augmentation) takes seeds below 2**32.
SEED_LIMIT = 2**32
# The largest side of a crop, window or input size: 8192 x 8192 is 0.8 GB per float image in a batch already.
MAX_SIDE = 8192
# Class names are printed in tables and drawn into images (the confusion matrix): a name is a word or two.
MAX_CLASS_NAME = 200


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
    if trainer.max_iters > MAX_ITERS:
        raise ConfigError(f"trainer.max_iters must be at most {MAX_ITERS:,}, got {trainer.max_iters}")
    if trainer.seed >= SEED_LIMIT:
        raise ConfigError(f"trainer.seed must be below 2**32 = {SEED_LIMIT} (numpy's limit), got {trainer.seed}")
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
    if values is None or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                      for v in values):
        shown = list(value) if OmegaConf.is_list(value) else value
        raise ConfigError(f"{key} must be [H, W] of positive integers, e.g. [512,512]; got {shown}")
    if max(values) > MAX_SIDE:
        raise ConfigError(f"{key} must be at most {MAX_SIDE} pixels per side, got {list(values)}: a larger size "
                          "needs tens of GB per image")


def _check_eval(evaluation: DictConfig) -> None:
    """The protocol (segtrain.engine.inference reads these as valid)."""
    if evaluation.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {evaluation.batch_size}")
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
    _positive_pair("bench.crop_size", bench.crop_size)
    if bench.batch_size < 2 or bench.steps < 1 or bench.warmup < 0:
        raise ConfigError("bench.batch_size must be >= 2 (BatchNorm), bench.steps >= 1, bench.warmup >= 0")


def _check_augment(augment: DictConfig) -> None:
    """The training augmentation (segtrain.data.transforms builds it later; a bad value fails here first)."""
    _positive_pair("dataset.augment.crop_size", augment.crop_size)
    for key in ("color_jitter", "gaussian_blur", "rotate_prob", "rotate", "enhance_jitter"):
        if not (_is_number(augment[key]) and augment[key] >= 0):
            raise ConfigError(f"dataset.augment.{key} must be >= 0 (0: off), got {augment[key]}")
    for key in ("gaussian_blur", "rotate_prob"):
        if augment[key] > 1:
            raise ConfigError(f"dataset.augment.{key} is a probability, between 0 and 1; got {augment[key]}")
    if augment.rotate > 180:
        raise ConfigError(f"dataset.augment.rotate is the largest angle in degrees (0 < rotate <= 180, or 0 for "
                          f"none), got {augment.rotate}")
    if augment.enhance_jitter >= 1:
        raise ConfigError(f"dataset.augment.enhance_jitter must be in (0, 1) (or 0 for none), got "
                          f"{augment.enhance_jitter}")
    scale_range = list(augment.scale_range)
    if len(scale_range) != 2 or not all(_is_number(v) for v in scale_range) or not 0 < scale_range[0] <= \
            scale_range[1]:
        raise ConfigError(f"dataset.augment.scale_range must be [low, high] with 0 < low <= high, got {scale_range}")


def check_class_name_values(names: list[Any], key: str = "dataset.class_names") -> None:
    """At least two names, each one short line: names go into tables, file names and images."""
    if len(names) < 2:
        raise ConfigError(f"{key} {'is empty' if not names else f'has only {names[0]!r}'}: name at least 2 "
                          "classes, the one of mask value 0 first, e.g. [background,crack]")
    for index, name in enumerate(names):
        text = str(name)
        if not text.strip() or len(text) > MAX_CLASS_NAME or not text.isprintable():
            shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
            raise ConfigError(f"{key}[{index}]={shown!r}: a class name must be 1 to {MAX_CLASS_NAME} printable "
                              "characters on one line (no newline or tab)")


def _check_dataset(dataset: DictConfig) -> None:
    if not OmegaConf.is_missing(dataset, "class_names"):
        check_class_name_values(list(dataset.class_names))
    if not OmegaConf.is_missing(dataset, "root"):
        root = Path(str(dataset.root))
        if not str(dataset.root).strip():
            raise ConfigError("dataset.root is empty: give the folder of the dataset")
        if root.exists() and not root.is_dir():
            raise ConfigError(f"dataset.root={root} is a file, not a folder: give the folder that holds the dataset")
    augment = dataset.get("augment")
    if isinstance(augment, DictConfig):
        _check_augment(augment)


def _channel_counts(node: DictConfig, path: str) -> list[tuple[str, Any]]:
    """(key, value) of every `channels` / `*_channels` key in a `_target_` node and the nodes inside it."""
    found = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            continue
        value, where = node[key], f"{path}.{key}"
        if isinstance(value, DictConfig):
            found.extend(_channel_counts(value, where))
        elif str(key) == "channels" or str(key).endswith("_channels"):
            found.append((where, value))
    return found


def _check_network(cfg: DictConfig) -> None:
    """Channel counts of the model and backbone: a width of 0 or less fails inside a layer's constructor."""
    for section in ("model", "backbone"):
        node = _section(cfg, section)
        for key, value in _channel_counts(node, section) if node is not None else []:
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{key} must be a positive number of channels, got {value}")
        dropout = node.get("dropout") if node is not None else None
        if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
            raise ConfigError(f"{section}.dropout must be in [0, 1) (0: off), got {dropout}")


def check_weights_path(key: str, value: Any) -> None:
    """A checkpoint file named by `key` exists and is a file; a folder gets the checkpoints it holds named."""
    path = Path(str(value))
    if path.is_dir():
        found = [p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt",
                             path / "last.pt") if p.is_file()]
        hint = f", e.g. {key}={found[0]}" if found else " (a run's checkpoints are in <run dir>/checkpoints/)"
        raise ConfigError(f"{key}={path} is a folder: give a checkpoint file (.pt/.pth){hint}")
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; give a segtrain checkpoint or a state dict (.pt/.pth)")


def _check_start(cfg: DictConfig) -> None:
    """train: resume= and init_from= are two ways to start; one at a time; init_from names a file."""
    init_from, resume = cfg.get("init_from"), cfg.get("resume")
    if init_from not in (None, ""):
        check_weights_path("init_from", init_from)
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
    for section_name in ("export", "info"):
        section = _section(cfg, section_name)
        if section is not None:
            _positive_pair(f"{section_name}.input_size", section.input_size)
    _check_start(cfg)
    _check_class_names(cfg)
    dataset = _section(cfg, "dataset")
    if dataset is not None:
        _check_dataset(dataset)
    _check_network(cfg)
    _check_flip_pairs(cfg)
