"""Optimizers with two parameter groups: the (pretrained) backbone and everything else."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.config import OptimizerConfig
from segtrain.errors import ConfigError


def parameter_groups(model: nn.Module, base_lr: float, head_lr_mult: float) -> list[dict]:
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    groups = [{"params": backbone, "lr": base_lr, "name": "backbone"}]
    groups.append({"params": head, "lr": base_lr * head_lr_mult, "name": "head"})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer.name={cfg.name!r} is unknown; available: sgd, adamw")
