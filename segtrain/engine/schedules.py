"""Learning-rate schedules: the `schedule` config group (conf/schedule/), one function per schedule.

A schedule is a pure function `lr(base_lr, iteration, max_iters, **its keys)`: the learning rate of
an iteration follows from the configuration and the iteration alone, so nothing about it is stored
in checkpoints and a resumed run computes its rates from the configuration it is started with.
The optimizer step of iteration i (1-based) uses `lr(base_lr, i - 1, max_iters)`.
"""

from __future__ import annotations

import math

from segtrain.errors import ConfigError


def _warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    if warmup_iters < 0 or not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError("schedule.warmup_iters must be >= 0 and schedule.warmup_ratio in [0, 1]")
    if iteration >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters


def _check_min_lr(base_lr: float, min_lr: float) -> None:
    if not 0.0 <= min_lr <= base_lr:
        raise ConfigError(f"schedule.min_lr must be in [0, optimizer.lr={base_lr}], got {min_lr}: the rate would "
                          "rise or turn negative")


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0,
            warmup_iters: int = 0, warmup_ratio: float = 0.1) -> float:
    """(base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr, times a linear warmup factor
    rising from `warmup_ratio` to 1 over the first `warmup_iters` iterations (DeepLab, PSPNet)."""
    _check_min_lr(base_lr, min_lr)
    if power < 0:
        raise ConfigError(f"schedule.power must be >= 0, got {power}")
    progress = min(iteration, max_iters) / max_iters
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    return lr * _warmup_factor(iteration, warmup_iters, warmup_ratio)


def cosine_lr(base_lr: float, iteration: int, max_iters: int, min_lr: float = 0.0, warmup_iters: int = 0,
              warmup_ratio: float = 0.1) -> float:
    """min_lr + (base_lr - min_lr) * (1 + cos(pi * it / max_iters)) / 2, with the same linear warmup."""
    _check_min_lr(base_lr, min_lr)
    progress = min(iteration, max_iters) / max_iters
    lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * _warmup_factor(iteration, warmup_iters, warmup_ratio)
