"""Learning-rate schedules: the `schedule` config group (conf/schedule/), one function per schedule.

A schedule is a pure function `lr(base_lr, iteration, max_iters, **its keys)`: the learning rate of
an iteration follows from the configuration and the iteration alone, so nothing about it is stored
in checkpoints and a resumed run computes its rates from the configuration it is started with.
The optimizer step of iteration i (1-based) uses `lr(base_lr, i - 1, max_iters)`. The keys' values
are checked on the composed `schedule` node (segtrain.config_checks); these functions take them as valid.
"""

from __future__ import annotations

import math


def _warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    if iteration >= warmup_iters:
        return 1.0
    return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0,
            warmup_iters: int = 0, warmup_ratio: float = 0.1) -> float:
    """(base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr, times a linear warmup factor
    rising from `warmup_ratio` to 1 over the first `warmup_iters` iterations (DeepLab, PSPNet)."""
    progress = min(iteration, max_iters) / max_iters
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    return lr * _warmup_factor(iteration, warmup_iters, warmup_ratio)


def cosine_lr(base_lr: float, iteration: int, max_iters: int, min_lr: float = 0.0, warmup_iters: int = 0,
              warmup_ratio: float = 0.1) -> float:
    """min_lr + (base_lr - min_lr) * (1 + cos(pi * it / max_iters)) / 2, with the same linear warmup."""
    progress = min(iteration, max_iters) / max_iters
    lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * _warmup_factor(iteration, warmup_iters, warmup_ratio)
