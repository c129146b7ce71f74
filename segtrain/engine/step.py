"""The training step: the one implementation of an optimizer step in segtrain.

`segtrain train`, `segtrain bench` and the scripts under benchmarks/ all run `TrainStep`, built by
`build_train_step` from the same config sections (loss, optimizer, schedule, trainer).

One call is one optimizer step over the global batch's share of this process: set the learning
rate of the iteration, run each accumulation pass under autocast (DDP synchronises the gradients
on the last pass only), scale the loss for fp16 (GradScaler), clip the gradients' total norm
(`trainer.clip_grad_norm`, on the unscaled gradients), and either update the weights or, with
`trainer.nan_policy=skip` and a non-finite loss on any process, skip the whole step.

A step reads nothing back from the device. A skipped step is decided on the device and leaves no
trace: the fused optimizer update is masked by a device flag (its `found_inf`, as GradScaler uses
it; under fp16 the gradients are poisoned so that the scaler skips the update), and the BatchNorm
running statistics, which the forward pass already moved, are restored from a copy taken before it.
Only an optimizer without the fused update (a user's own) makes the skip decision on the host.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from segtrain.data.normalization import normalization, normalize_images
from segtrain.engine.compile import RegionalCompile, compile_model, eager
from segtrain.engine.distributed import DistContext, all_reduce_sum
from segtrain.engine.optim import build_optimizer
from segtrain.engine.runtime import Runtime, autocast
from segtrain.errors import ConfigError
from segtrain.instantiate import instantiate_checked
from segtrain.losses import SegmentationLoss

log = logging.getLogger("segtrain.train")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor  # this process's share of the global batch's loss (detached, on the device)
    finite: torch.Tensor  # whether that loss is finite (a device bool: reading it synchronises)
    # nan_policy=skip and a non-finite loss on some process: the step left no trace (weights, optimizer state and
    # BatchNorm statistics as before it). A device bool, the same on every process: reading it synchronises.
    skipped: torch.Tensor
    # The gradients' total norm before clipping (trainer.clip_grad_norm; None when off), on the device.
    # DDP has averaged the gradients, so it is the same on every process.
    grad_norm: torch.Tensor | None = None


class FirstCallFallback:
    """Run a compiled module; if its first call fails, run the eager module from then on.

    torch.compile compiles lazily, so an unusable compiler surfaces at the first call. Only that call
    is guarded: a later failure (out of memory, a CUDA error) is raised as what it is. `on_failure`
    undoes the compilation (regional compile compiles submodules in place).
    """

    def __init__(self, compiled: Callable, eager: nn.Module, on_failure: Callable[[], None] | None = None) -> None:
        self.module, self.eager, self.checked, self.on_failure = compiled, eager, False, on_failure

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.checked:
            return self.module(images)
        try:
            outputs = self.module(images)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("trainer.compile: compilation failed (%s: %s); training without torch.compile",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            if self.on_failure is not None:
                self.on_failure()
            self.module = self.eager
            outputs = self.module(images)
        self.checked = True
        return outputs


def compile_regions(model: nn.Module, network: nn.Module) -> tuple[Callable, RegionalCompile | None]:
    """`network` (the model or its DDP wrapper) with `model`'s regions compiled in place, behind the
    first-call fallback; the regions, or None where torch.compile is unavailable."""
    try:
        regions = RegionalCompile(model)
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("trainer.compile=true: torch.compile is unavailable here (%s); training without it", exc)
        return network, None
    log.info("trainer.compile=regions: %d regions compiled in place (backbone blocks and head); "
             "validation runs eagerly", len(regions.regions))
    return FirstCallFallback(network, network, on_failure=regions.remove), regions


def compile_network(network: nn.Module) -> Callable:
    """`network` (the model or its DDP wrapper) compiled as one graph behind the first-call fallback; `network`
    itself where torch.compile is unavailable. The model stays eager for everything but the training step."""
    try:
        compiled = compile_model(network)
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("trainer.compile=model: torch.compile is unavailable here (%s); training without it", exc)
        return network
    log.info("trainer.compile=model: the training network is compiled as one graph; validation runs eagerly")
    return FirstCallFallback(compiled, network)


def auxiliary_outputs(model: nn.Module) -> tuple[str, ...]:
    """The output keys besides "out" that a model declares for training (segmentor contract)."""
    declared = getattr(model, "auxiliary_outputs", None)
    return tuple(declared()) if callable(declared) else ()


def build_loss(cfg: DictConfig, num_classes: int, ignore_index: int) -> SegmentationLoss:
    loss = instantiate_checked("loss", cfg.loss, num_classes=num_classes, ignore_index=ignore_index)
    if not isinstance(loss, SegmentationLoss):
        raise ConfigError(f"loss._target_={cfg.loss._target_!r} is not a segtrain.losses.SegmentationLoss")
    return loss


def build_lr_schedule(cfg: DictConfig) -> Callable[[int], float]:
    """iteration -> base learning rate: the schedule node applied to optimizer.lr and trainer.max_iters."""
    schedule = instantiate_checked("schedule", cfg.schedule, partial=True,
                                   supplied=("base_lr", "iteration", "max_iters"))
    base_lr, max_iters = float(cfg.optimizer.lr), int(cfg.trainer.max_iters)

    def lr_at(iteration: int) -> float:
        return schedule(base_lr=base_lr, iteration=iteration, max_iters=max_iters)

    lr_at(0)  # a bad key value fails now, not at the first step
    return lr_at


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward pass changes: BatchNorm's running mean, variance and batch count."""
    return [buffer for module in model.modules() if isinstance(module, _NormBase) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked) if buffer is not None]


def masks_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can be skipped by a device flag: PyTorch's fused updates take GradScaler's
    `found_inf` and leave parameters and state (step counts included) untouched where it is set."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def start_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """Before the first step: zero momentum buffers for SGD, so that a masked first step leaves a defined state.

    Fused SGD allocates its buffers uninitialised at the first step and fills them there; a masked first
    step would leave them so. With dampening 0 a zero buffer gives the same first update bit for bit
    (momentum * 0 + grad). False when that does not hold (dampening > 0): the caller decides on the host.
    """
    if not isinstance(optimizer, torch.optim.SGD) or optimizer.state:
        return True
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:
            return False
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return True


class TrainStep:
    """One optimizer step: `step(iteration, batches)` with one (images, masks) pair per accumulation pass."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: SegmentationLoss,
                 lr_at: Callable[[int], float], ctx: DistContext, runtime: Runtime, nan_policy: str = "stop",
                 clip_grad_norm: float | None = None,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        self.model, self.optimizer, self.loss, self.lr_at, self.ctx = model, optimizer, loss, lr_at, ctx
        # (mean, std) for uint8 batches (segtrain.data.normalization.normalize_images); float batches are used as
        # they are (normalised already).
        self.normalize = normalize
        self.device, self.amp, self.nan_policy = runtime.device, runtime.amp, nan_policy
        self.clip_grad_norm = clip_grad_norm
        self.memory_format = runtime.memory_format
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.amp == "fp16")
        self.ddp: DistributedDataParallel | None = None
        network: nn.Module = model
        if ctx.enabled:
            # A declared auxiliary head that the loss does not weight gets no gradient: tell DDP.
            unused = bool(auxiliary_outputs(model)) and loss.aux_weight == 0
            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None, find_unused_parameters=unused)
            network = self.ddp
        self.forward: Callable = network
        # nan_policy=skip: the BatchNorm statistics and their copy from before the step's forward passes.
        self.statistics = running_statistics(model) if nan_policy == "skip" else []
        self.saved_statistics = [buffer.clone() for buffer in self.statistics]
        self.never_skipped = torch.zeros((), dtype=torch.bool, device=self.device)
        self.regions: RegionalCompile | None = None
        self.compile = runtime.compile
        if runtime.compile == "regions":
            self.forward, self.regions = compile_regions(model, network)
        elif runtime.compile == "model":
            self.forward = compile_network(network)

    @property
    def compiled(self) -> bool:
        """Whether the training forward runs compiled (False: compile off, or fallen back to eager)."""
        if self.regions is not None:
            return bool(self.regions.regions)  # emptied when the first call fell back
        return isinstance(self.forward, FirstCallFallback) and self.forward.module is not self.forward.eager

    def eager(self) -> contextlib.AbstractContextManager:
        """Where the model runs outside the training step (validation): anything compiled runs eagerly (the
        compiled regions; with trainer.compile=model the model is eager already, this guards any other call)."""
        return eager() if self.compile != "off" else contextlib.nullcontext()

    def lr(self, iteration: int) -> float:
        """The base (backbone) learning rate of iteration `iteration` (1-based)."""
        return self.lr_at(iteration - 1)

    def set_lr(self, iteration: int) -> None:
        base = self.lr(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = base * group.get("lr_scale", 1.0)

    def to_device(self, batches: Sequence[Batch]) -> list[Batch]:
        """Compact batches (uint8 images, uint8/int16 masks) copied as they are, then converted on the device:
        normalised float images in the model's memory format, int64 class indices."""
        on_device = []
        for images, masks in batches:
            if images.dtype == torch.uint8 and self.normalize is None:
                raise ValueError("TrainStep got uint8 images but no normalize=(mean, std) to convert them with")
            images = images.to(self.device, non_blocking=True)
            images = normalize_images(images, *self.normalize, self.memory_format) if self.normalize else \
                images.contiguous(memory_format=self.memory_format)
            on_device.append((images, masks.to(self.device, non_blocking=True).long()))
        return on_device

    def backward(self, batches: list[Batch]) -> torch.Tensor:
        """Forward and backward over every pass; the loss is normalised over the global batch."""
        local = sum(self.loss.normalizer(masks) for _, masks in batches)
        # DDP averages gradients over processes, hence the x world size.
        normalizer = all_reduce_sum(local.float(), self.ctx).clamp(min=1e-12) / self.ctx.world_size
        total = torch.zeros((), device=self.device)
        for n, (images, masks) in enumerate(batches):
            last = n == len(batches) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with autocast(self.device, self.amp):
                    outputs = self.forward(images)
                loss = self.loss(outputs, masks, normalizer)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def clip(self) -> torch.Tensor | None:
        """Scale the gradients down to a total norm of at most `clip_grad_norm`; their norm before.

        Under fp16 the gradients are unscaled first (the scaler then does not unscale them again in
        step), so the limit applies to the true gradients. The norm stays on the device: no host sync.
        A non-finite norm leaves the gradients to the scaler (fp16 skips the step) or the nan policy.
        """
        if self.clip_grad_norm is None:
            return None
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm).detach()

    def update(self, finite: torch.Tensor) -> torch.Tensor:
        """Apply the gradients; the device flag of a skipped step (nan_policy=skip, a non-finite loss anywhere)."""
        if self.nan_policy != "skip":
            self.apply(None)
            return self.never_skipped
        skipped = all_reduce_sum(finite.float(), self.ctx) < self.ctx.world_size
        if self.scaler.is_enabled():
            # fp16: NaN gradients make the scaler skip the update (on the device with a fused optimizer) and
            # halve its scale, as for any overflow.
            start_momentum(self.optimizer)
            poison = torch.where(skipped, float("nan"), 0.0)
            torch._foreach_add_([p.grad for p in self.model.parameters() if p.grad is not None], poison)
            self.apply(None)
        elif masks_on_device(self.optimizer) and start_momentum(self.optimizer):
            self.apply(skipped)
        elif bool(skipped):  # an optimizer without the fused update: decided on the host
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.apply(None)
        for statistic, saved in zip(self.statistics, self.saved_statistics):
            torch.where(skipped, saved, statistic, out=statistic)
        return skipped

    def apply(self, skipped: torch.Tensor | None) -> None:
        """The optimizer step, masked by the device flag `skipped` when given; then the gradients are dropped."""
        if skipped is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skipped.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, iteration: int, batches: Sequence[Batch]) -> StepResult:
        self.set_lr(iteration)
        if self.statistics:
            torch._foreach_copy_(self.saved_statistics, self.statistics)
        total = self.backward(self.to_device(batches))
        finite = torch.isfinite(total)
        grad_norm = self.clip()
        return StepResult(total, finite, skipped=self.update(finite), grad_norm=grad_norm)


def check_aux_weight(model: nn.Module, given: set[str]) -> None:
    """`loss.aux_weight` given for a model without auxiliary heads would do nothing: refuse it."""
    if "loss.aux_weight" in given and not auxiliary_outputs(model):
        raise ConfigError(f"loss.aux_weight is set, but {type(model).__name__} has no auxiliary head (only PSPNet "
                          "has one, with model.aux=true); remove the key")


def clip_limit(trainer: DictConfig) -> float | None:
    """trainer.clip_grad_norm as a float, or None when clipping is off (null)."""
    limit = trainer.get("clip_grad_norm")
    return None if limit is None else float(limit)


def build_train_step(cfg: DictConfig, model: nn.Module, ctx: DistContext, runtime: Runtime, num_classes: int,
                     given: Collection[str] = ()) -> TrainStep:
    """The trainer's step for `model` (already on its device) from cfg's loss, optimizer and schedule;
    `given`: the keys set on the command line (segtrain.keys.given_keys of RunInfo.overrides)."""
    check_aux_weight(model, set(given))
    loss = build_loss(cfg, num_classes, int(cfg.dataset.ignore_index)).to(ctx.device)
    optimizer = build_optimizer(cfg.optimizer, model)
    return TrainStep(model, optimizer, loss, build_lr_schedule(cfg), ctx, runtime,
                     nan_policy=str(cfg.trainer.nan_policy), clip_grad_norm=clip_limit(cfg.trainer),
                     normalize=normalization(cfg))
