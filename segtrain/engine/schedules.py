"""Learning-rate schedules, updated every iteration."""

from __future__ import annotations

import torch

from segtrain.config import ScheduleConfig
from segtrain.errors import ConfigError


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """lr = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr."""
    progress = min(iteration, max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


class PolyWithWarmup:
    """LR factor for LambdaLR: poly decay, scaled by a linear warmup over the first iterations.

    A plain object (not a closure) so that LambdaLR stores its fields in the checkpoint.
    """

    def __init__(self, max_iters: int, power: float, warmup_iters: int, warmup_ratio: float,
                 min_lr_ratio: float) -> None:
        self.max_iters, self.power = max_iters, power
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, iteration: int) -> float:
        factor = poly_lr(1.0, iteration, self.max_iters, self.power, self.min_lr_ratio)
        if iteration < self.warmup_iters:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return factor


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, max_iters: int, base_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.name != "poly":
        raise ConfigError(f"schedule.name={cfg.name!r} is unknown; available: poly")
    if cfg.warmup_iters < 0 or not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ConfigError("schedule.warmup_iters must be >= 0 and schedule.warmup_ratio in [0, 1]")
    factor = PolyWithWarmup(max_iters, cfg.power, cfg.warmup_iters, cfg.warmup_ratio, cfg.min_lr / base_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
