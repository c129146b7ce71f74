"""The training loop: iteration-based, poly LR every step, periodic validation and checkpoints.

Runs alike in one process or under torchrun: `trainer.batch_size` is the global batch, split over
processes and accumulation steps; the loss is normalised by the labelled pixels of the whole
global batch, so any split gives the gradient of one big batch. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from segtrain.data.loading import build_dataset, eval_loader, train_loader
from segtrain.engine.checkpoint import (
    CHECKPOINT_DIR,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_periodic,
)
from segtrain.engine.distributed import (
    DistContext,
    all_reduce_sum,
    apply_sync_bn,
    barrier,
    broadcast_object,
    init_distributed,
    micro_batch_size,
    should_sync_bn,
)
from segtrain.engine.evaluate import autocast, evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.losses import segmentation_loss
from segtrain.engine.optim import build_optimizer, load_optimizer_state
from segtrain.engine.preemption import PreemptionHandler
from segtrain.engine.runtime import check_amp, progress_enabled, seed_everything
from segtrain.engine.schedules import build_scheduler
from segtrain.errors import ConfigError, Preempted, TrainingStopped
from segtrain.models import build_model
from segtrain.visualize import denormalize, make_palette, panel

log = logging.getLogger("segtrain.train")

StepCallback = Callable[[int, nn.Module], None]


def check_trainer_config(cfg: DictConfig) -> None:
    t = cfg.trainer
    for key in ("max_iters", "batch_size", "grad_accum_steps", "val_interval", "ckpt_interval", "keep_last"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {t[key]}")
    for key in ("interval", "image_interval"):
        if cfg.logging[key] < 1:
            raise ConfigError(f"logging.{key} must be >= 1, got {cfg.logging[key]}")
    check_amp(t.amp)
    if t.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"trainer.nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}")


def _resolve_resume(cfg: DictConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    if cfg.resume in (None, "", False):
        return None
    if cfg.resume == "auto":
        found = find_resume_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s; starting from scratch", run_dir / CHECKPOINT_DIR)
        return found
    path = Path(str(cfg.resume))
    return path, load_checkpoint(path)


def _check_same_classes(state: dict, class_names: list[str], path: Path) -> None:
    saved = list(state.get("class_names", []))
    if saved != class_names:
        raise ConfigError(
            f"checkpoint {path} was trained for {len(saved)} classes {saved[:6]}..., but dataset "
            f"{len(class_names)} classes {class_names[:6]}...; resume with the dataset it was trained on"
        )


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("trainer.compile=true: torch.compile is unavailable here (%s); training without it", exc)
        return model


def train(cfg: DictConfig, run_dir: Path, on_step: StepCallback | None = None) -> dict:
    """Train per `cfg`, writing checkpoints, TensorBoard events and metrics under `run_dir` (rank 0).

    `on_step(iteration, model)` is called after every optimizer step (tests, instrumentation).
    """
    check_trainer_config(cfg)
    t = cfg.trainer
    ctx: DistContext = init_distributed(t.device)
    device = ctx.device
    if not ctx.is_main:
        logging.getLogger("segtrain").setLevel(logging.WARNING)
    micro_batch = micro_batch_size(t.batch_size, ctx.world_size, t.grad_accum_steps)
    if micro_batch < 2 and not t.freeze_bn and not should_sync_bn(t.sync_bn, ctx.world_size, device.type):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} gives {micro_batch} image per process and step: BatchNorm needs "
            "at least 2 (raise trainer.batch_size, use fewer accumulation steps, or trainer.freeze_bn=true)"
        )
    run_dir = Path(broadcast_object(str(run_dir), ctx))  # every rank reads rank 0's run directory
    seed_everything(t.seed, t.deterministic)
    class_names = list(cfg.dataset.class_names)
    num_classes = len(class_names)

    train_set = build_dataset(cfg.dataset, cfg.dataset.train_split, train=True, on_error=cfg.data.on_error)
    val_set = build_dataset(cfg.dataset, cfg.dataset.val_split, train=False)
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size)
    model = build_model(cfg.model, cfg.backbone, num_classes)
    model = apply_sync_bn(model, t.sync_bn, ctx.world_size, device.type).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.schedule, optimizer, t.max_iters, cfg.optimizer.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    aux_weight = float(cfg.model.get("aux_weight", 0.0))
    ignore_index = cfg.dataset.ignore_index

    start_iter, best_miou, resumed_skips = 0, -1.0, 0
    resume = _resolve_resume(cfg, run_dir)
    if resume is not None:
        path, state = resume
        _check_same_classes(state, class_names, path)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        configured = [dict(vars(fn)) for fn in scheduler.lr_lambdas]
        scheduler.load_state_dict(state["scheduler"])
        for fn, fields in zip(scheduler.lr_lambdas, configured):
            if vars(fn) != fields:
                log.warning("the schedule differs from the checkpoint's (%s -> %s): continuing with the configured one",
                            vars(fn), fields)
                fn.__dict__.update(fields)
                for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start_iter, best_miou = int(state["iteration"]), float(state["best_miou"])
        resumed_skips = int(state.get("skipped_steps", 0))
        log.info("resumed from %s at iteration %d (lr %.6g)", path, start_iter, optimizer.param_groups[0]["lr"])

    if ctx.enabled:
        # An auxiliary head that the loss ignores (aux_weight 0) gets no gradient: tell DDP.
        unused_aux = aux_weight == 0 and any(name.startswith("aux") for name, _ in model.named_children())
        ddp: nn.Module | None = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused_aux
        )
        eager: nn.Module = ddp
    else:
        ddp, eager = None, model
    net = compiled(eager, t.compile)

    loader = train_loader(train_set, micro_batch, t.num_workers, t.seed, start_iter * t.batch_size,
                          pin_memory=device.type == "cuda", rank=ctx.rank, world_size=ctx.world_size)
    val_loader = eval_loader(val_set, cfg.eval.batch_size, cfg.eval.num_workers, device.type == "cuda")
    log.info(
        "model %s + %s: %.2fM parameters; %d train / %d val images; effective (global) batch %d = %d per "
        "pass x accumulation %d x world size %d; device %s, amp %s%s",
        cfg.model._target_.rsplit(".", 1)[-1], cfg.backbone.get("name", cfg.backbone._target_),
        sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), len(val_set), t.batch_size,
        micro_batch, t.grad_accum_steps, ctx.world_size, device, t.amp,
        ", SyncBatchNorm" if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) else "",
    )
    writer = SummaryWriter(str(run_dir)) if cfg.logging.tensorboard and ctx.is_main else None
    palette = make_palette(cfg.dataset.palette, num_classes)
    ckpt_dir = run_dir / CHECKPOINT_DIR

    def checkpoint_state(iteration: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
            "best_miou": best_miou,
            "skipped_steps": skipped_steps,
            "rng": rng_state(),
            "class_names": class_names,
            "config": OmegaConf.to_yaml(cfg, resolve=True),
        }

    def validate(iteration: int, log_images: bool) -> float:
        if ctx.enabled:  # without SyncBatchNorm each rank's running statistics drift; evaluate rank 0's model
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        result = evaluate(model, val_loader, num_classes, device, t.amp, ignore_index, settings,
                          num_examples=cfg.logging.num_images if log_images and ctx.is_main else 0)
        m = result.metrics
        log.info("iter %d: val mIoU %.4f, pixel acc %.4f, mean acc %.4f", iteration, m["miou"],
                 m["pixel_acc"], m["mean_acc"])
        if writer is not None:
            writer.add_scalar("val/mIoU", m["miou"], iteration)
            writer.add_scalar("val/pixel_acc", m["pixel_acc"], iteration)
            writer.add_scalar("val/mean_acc", m["mean_acc"], iteration)
            for name, iou in zip(class_names, m["iou"]):
                if not math.isnan(iou):
                    writer.add_scalar(f"val_iou/{name}", iou, iteration)
            for k, (image, mask, pred) in enumerate(result.examples):
                rgb = denormalize(image, cfg.dataset.mean, cfg.dataset.std)
                writer.add_image(f"val_images/{k}", panel(rgb, mask, pred, palette), iteration,
                                 dataformats="HWC")
        return m["miou"]

    def set_train_mode() -> None:
        model.train()
        if t.freeze_bn:
            freeze_batchnorm(model)

    set_train_mode()
    show_progress = progress_enabled(cfg.logging.progress) and ctx.is_main
    bar = tqdm(total=t.max_iters, initial=start_iter, desc="train", unit="it", disable=not show_progress,
               dynamic_ncols=True)
    data = iter(loader)
    last_miou, last_images, tic = math.nan, start_iter // cfg.logging.image_interval, time.perf_counter()
    history: list[dict[str, float]] = []
    skipped: set[str] = set()
    skipped_count, skipped_steps = 0, resumed_skips
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    # First iteration with a non-finite loss, tracked on the device (no host sync per step) and
    # checked at every logging interval and before every checkpoint: a bad state is never saved.
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    lrs: dict[int, float] = {}

    def last_good_checkpoint() -> str:
        return str(ckpt_dir / "last.pt") if (ckpt_dir / "last.pt").exists() else "none written yet"

    def check_finite() -> None:
        worst = first_bad.clone()
        if ctx.enabled:  # a NaN on any rank poisons every rank's weights through the gradient average
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        bad = int(worst)
        if bad:
            raise TrainingStopped(
                f"non-finite loss at iteration {bad} (lr {lrs.get(bad, float('nan')):.6g}); trainer.nan_policy=stop. "
                f"Last good checkpoint: {last_good_checkpoint()}. Lower optimizer.lr, add schedule.warmup_iters, "
                "check the data with `segtrain data check`, or set trainer.nan_policy=skip"
            )

    def save_periodic_checkpoint(iteration: int) -> Path | None:
        check_finite()
        if ctx.is_main:
            return save_periodic(checkpoint_state(iteration), ckpt_dir, t.keep_last)
        return None

    def forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal net
        if net is eager:
            return net(images)
        try:  # torch.compile compiles lazily: its failures surface at the first call
            return net(images)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("trainer.compile=true: compilation failed (%s: %s); training without torch.compile",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            net = eager
            return net(images)

    def train_step(iteration: int) -> torch.Tensor:
        nonlocal skipped_count
        batches = []
        for _ in range(t.grad_accum_steps):
            batch = next(data)
            for report in batch["skipped"]:
                for problem in filter(None, report.split("\n")):
                    skipped_count += 1
                    if problem not in skipped:
                        skipped.add(problem)
                        log.warning("data.on_error=skip: skipping a sample: %s", problem)
            batches.append((batch["image"].to(device, non_blocking=True, memory_format=memory_format),
                            batch["mask"].to(device, non_blocking=True)))
        # Labelled pixels of the whole global batch; DDP averages gradients over ranks, hence x world.
        labelled = all_reduce_sum(sum((m != ignore_index).sum() for _, m in batches).float(), ctx)
        normalizer = labelled.clamp(min=1) / ctx.world_size
        loss_sum = torch.zeros((), device=device)
        for step, (images, masks) in enumerate(batches):
            skip_sync = ddp is not None and step < len(batches) - 1
            with ddp.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast(device, t.amp):
                    outputs = forward(images)
                loss = segmentation_loss(outputs, masks, aux_weight, ignore_index, normalizer)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    with PreemptionHandler() as preemption, contextlib.ExitStack() as cleanup:
        cleanup.callback(bar.close)
        if writer is not None:  # flush TensorBoard events on any exit, preemption and errors included
            cleanup.callback(writer.close)
        for iteration in range(start_iter + 1, t.max_iters + 1):
            lr = optimizer.param_groups[0]["lr"]  # the base (backbone) LR of this step
            lrs[iteration] = lr
            try:
                loss_sum = train_step(iteration)
            except torch.OutOfMemoryError:
                raise TrainingStopped(
                    f"out of GPU memory at iteration {iteration}: {micro_batch} images of "
                    f"{list(cfg.dataset.augment.crop_size)} per pass (trainer.batch_size={t.batch_size}, "
                    f"world size {ctx.world_size}, trainer.grad_accum_steps={t.grad_accum_steps}), "
                    f"trainer.amp={t.amp}. Raise trainer.grad_accum_steps (same global batch, fewer images per "
                    "pass), use trainer.amp=bf16, or a smaller dataset.augment.crop_size"
                ) from None
            finite = torch.isfinite(loss_sum)
            if t.nan_policy == "skip" and not bool(all_reduce_sum(finite.float(), ctx) == ctx.world_size):
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at iteration %d (lr %.6g): step skipped (%d of at most %d)",
                            iteration, lr, skipped_steps, t.max_skipped_steps)
                if writer is not None:
                    writer.add_scalar("train/skipped_steps", skipped_steps, iteration)
                if skipped_steps > t.max_skipped_steps:
                    raise TrainingStopped(
                        f"{skipped_steps} steps had a non-finite loss (trainer.max_skipped_steps="
                        f"{t.max_skipped_steps}); last at iteration {iteration} (lr {lr:.6g}). Last good checkpoint: "
                        f"{last_good_checkpoint()}. Lower optimizer.lr or check the data (segtrain data check)"
                    )
            else:
                first_bad = torch.where((first_bad == 0) & ~finite, iteration, first_bad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            if on_step is not None:
                on_step(iteration, model)

            if iteration % cfg.logging.interval == 0 or iteration == t.max_iters:
                check_finite()  # the only host synchronisation of the loop, once per logging interval
                loss_value = float(all_reduce_sum(loss_sum, ctx)) / ctx.world_size  # the global batch's mean CE
                rate = cfg.logging.interval / max(time.perf_counter() - tic, 1e-9)
                tic = time.perf_counter()
                history.append({"iteration": iteration, "loss": loss_value, "lr": lr})
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if not show_progress and ctx.is_main:
                    log.info("iter %d/%d: loss %.4f, lr %.6g, %.2f it/s", iteration, t.max_iters, loss_value, lr,
                             rate)
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, iteration)
                    writer.add_scalar("train/lr", lr, iteration)
                    if cfg.data.on_error == "skip":
                        writer.add_scalar("data/skipped_samples", skipped_count, iteration)

            if iteration % t.val_interval == 0 or iteration == t.max_iters:
                check_finite()
                images_due = iteration // cfg.logging.image_interval > last_images or iteration == t.max_iters
                last_miou = validate(iteration, images_due)
                set_train_mode()
                if images_due:
                    last_images = iteration // cfg.logging.image_interval
                if last_miou > best_miou:
                    best_miou = last_miou
                    if ctx.is_main:
                        save_checkpoint(checkpoint_state(iteration), ckpt_dir / "best.pt")
                        log.info("new best mIoU %.4f at iteration %d: %s", best_miou, iteration,
                                 ckpt_dir / "best.pt")
            saved = None
            if iteration % t.ckpt_interval == 0 or iteration == t.max_iters:
                saved = save_periodic_checkpoint(iteration)
            stop = preemption.requested
            if ctx.enabled:  # every rank must stop at the same step
                stop = bool(all_reduce_sum(torch.tensor(float(stop), device=device), ctx) > 0)
            if stop and iteration < t.max_iters:
                if saved is None:
                    saved = save_periodic_checkpoint(iteration)
                barrier(ctx)
                signum = preemption.signum or signal.SIGTERM
                raise Preempted(
                    f"stopped by {signal.Signals(signum).name} after iteration {iteration}; checkpoint "
                    f"{ckpt_dir / 'last.pt'}. Resume with the same command plus hydra.run.dir={run_dir} resume=auto",
                    signum,
                )
    barrier(ctx)
    log.info("done: final val mIoU %.4f, best %.4f; checkpoints in %s", last_miou, best_miou, ckpt_dir)
    if skipped:
        log.warning("%d unusable samples were skipped (%d distinct problems)", skipped_count, len(skipped))
    return {"final_miou": last_miou, "best_miou": best_miou, "history": history, "model": model,
            "skipped": skipped_count, "skipped_steps": skipped_steps}
