"""Optimizers from the `optimizer` config group (conf/optimizer/): `_target_` names the class.

The node's keys are the optimizer's constructor arguments (`_partial_: true`: the parameters are
added here), plus `head_lr_mult`, the learning-rate multiplier of every parameter outside the
(pretrained) backbone. Every parameter group carries its `lr_scale`, so that the schedule sets
`lr = schedule(iteration) * lr_scale` per group.
"""

from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.errors import ConfigError
from segtrain.instantiate import instantiate_checked


def parameter_groups(model: nn.Module, base_lr: float, head_lr_mult: float) -> list[dict]:
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    groups = [{"params": backbone, "lr": base_lr, "lr_scale": 1.0, "name": "backbone"}]
    groups.append({"params": head, "lr": base_lr * head_lr_mult, "lr_scale": head_lr_mult, "name": "head"})
    return [g for g in groups if g["params"]]


def fused_update(groups: list[dict]) -> bool:
    """Whether PyTorch's fused (one kernel for all parameters) update applies to these parameters.

    It does on CPU and CUDA for floating-point parameters, and it is the fastest update there:
    SGD with momentum over DeepLab v3+ R50's 26.7M parameters takes 16 ms per step on 2 CPU
    threads fused, against 40 ms with the default per-parameter loop.
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer; call it after the model is on its device (the fused update depends on it).
    optimizer.lr and head_lr_mult are taken as valid (segtrain.config_checks)."""
    head_lr_mult = float(cfg.get("head_lr_mult", 1.0))
    groups = parameter_groups(model, float(cfg.lr), head_lr_mult)
    factory = instantiate_checked("optimizer", cfg, drop=("head_lr_mult",), partial=True, supplied=("params", "fused"))
    accepts_fused = "fused" in inspect.signature(factory).parameters
    optimizer = factory(groups, **({"fused": True} if accepts_fused and fused_update(groups) else {}))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer._target_={cfg._target_!r} is not a torch.optim.Optimizer")
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's per-parameter state (momentum buffers, moments) and nothing else.

    Group settings (learning rate and its scale, weight decay, momentum, and the update
    implementation: `fused`/`foreach`) stay this run's configuration. `load_state_dict` alone would
    take them all from the checkpoint: a changed `optimizer.weight_decay` would be silently ignored,
    and a checkpoint from a loop-update optimizer would turn the fused update off, which fails the
    GradScaler step of trainer.amp=fp16.
    """
    saved = state["param_groups"]
    current = optimizer.param_groups
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in current]:
        raise ConfigError(
            "the checkpoint's optimizer holds parameter groups of sizes "
            f"{[len(g['params']) for g in saved]}, this model {[len(g['params']) for g in current]}: it was "
            "trained with another model or backbone; resume with the configuration it was trained with"
        )
    groups = [{**{k: v for k, v in mine.items() if k != "params"}, "params": theirs["params"]}
              for theirs, mine in zip(saved, current)]
    optimizer.load_state_dict({"state": state["state"], "param_groups": groups})
