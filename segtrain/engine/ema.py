"""Exponential moving average of the weights (`trainer.ema_decay`).

After every optimizer step, each parameter's average moves towards it:
`ema = decay * ema + (1 - decay) * param` (one fused `lerp` over all parameters, no host sync).
Buffers (BatchNorm running statistics, counters) are copied from the model (one fused copy), not
averaged: they are measured with the raw weights, and copying them keeps the averaged model usable at
every step. A step skipped for a non-finite loss (a device flag) moves the average by nothing.
The average starts at the model's weights when training starts (after `init_from`).

The averaged model is a separate copy of the (unwrapped, never DDP-wrapped) model on the same
device, in eval mode and without gradients: one more copy of the weights in memory. Checkpoints hold
it as `ema` next to the raw `model`; validation, best.pt, eval, predict and export use it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def ema_decay(value: Any) -> float | None:
    """trainer.ema_decay (checked by segtrain.config_checks) as a decay in (0, 1), or None when off (null or 0)."""
    if value is None or value == 0:
        return None
    return float(value)


class WeightEma:
    """The averaged copy of `model`: `update(model)` after each optimizer step, `module` to evaluate."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One step of the average; `skipped` (a device bool) masks it without reading it."""
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        weight: float | torch.Tensor = 1.0 - self.decay
        if skipped is not None:
            weight = torch.where(skipped, 0.0, weight).to(averaged[0].dtype) if averaged else weight
        torch._foreach_lerp_(averaged, current, weight)  # ema + (1 - d) (p - ema) = d ema + (1 - d) p
        mine, theirs = list(self.module.buffers()), list(model.buffers())
        if mine:  # a skipped step restored the model's statistics: copying them again changes nothing
            torch._foreach_copy_(mine, theirs)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average over from `model`'s current weights."""
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def inference_weights(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The weights eval/predict/export use: the checkpoint's EMA weights when it has them."""
    averaged = state.get("ema")
    if isinstance(averaged, dict) and averaged:
        log.info("%s: using its exponential moving average of the weights ('ema'; the raw weights are 'model')",
                 source)
        return averaged
    return state["model"]
