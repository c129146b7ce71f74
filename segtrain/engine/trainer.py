"""The training loop: a step, then the callbacks at their events.

    trainer = Trainer(cfg, run_dir)
    trainer.setup()        # the Run: process group, runtime, data, model, step, records (segtrain.engine.run)
    trainer.resume()       # weights, optimizer, RNG and TrainState from a checkpoint (segtrain.engine.resume_run)
    trainer.fit()          # step -> callbacks, until trainer.max_iters
    trainer.close()        # gives the run directory back

`train(cfg, run_dir)` does all four. Runs alike in one process or under torchrun:
`trainer.batch_size` is the global batch, split over processes and accumulation steps, and the
loss is normalised over the whole global batch (segtrain.losses). Only rank 0 writes. What happens
around the step (logging, validation and best.pt, checkpoints, EMA, preemption, the records) is in
segtrain.engine.callbacks; a user's own callbacks come from the config's `callbacks`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from segtrain.data.loading import eval_loader, train_loader, train_worker_count
from segtrain.display import percent
from segtrain.engine.callbacks import (
    Callback,
    CallbackList,
    configured_callbacks,
    configured_trackers,
    default_callbacks,
)
from segtrain.engine.distributed import barrier, broadcast_object, init_distributed
from segtrain.engine.hparams import RunInfo
from segtrain.engine.lock import RunLock
from segtrain.engine.logger import tensorboard_logdir
from segtrain.engine.resume_run import prepare_run_directory, resume_run
from segtrain.engine.run import Run, build_run, describe, set_train_mode
from segtrain.engine.step import Batch, StepResult
from segtrain.errors import Preempted, TrainingStopped

log = logging.getLogger("segtrain.train")


@dataclass
class TrainResult:
    """What a finished run reports: its mIoU, where its checkpoints are, and the trained network."""

    run_dir: Path
    best_miou: float
    best_iteration: int
    final_miou: float
    best_checkpoint: Path | None  # best.pt, when this run or an earlier one in run_dir wrote it
    model: nn.Module
    skipped: int = 0  # unusable samples skipped (data.on_error=skip), this process
    skipped_steps: int = 0  # steps dropped for a non-finite loss (nan_policy=skip)
    skipped_val: int = 0  # unusable validation samples the final mIoU leaves out (data.on_error=skip)
    history: list[dict[str, float]] = field(default_factory=list)  # logged iteration, loss and lr


def _due(iteration: int, interval: int, last: bool) -> bool:
    return last or iteration % interval == 0


class Trainer:
    """Trains per `cfg`, writing checkpoints, TensorBoard events and metrics under `run_dir` (rank 0).

    `info`: what the command line set (overrides, group choices, sweep job), for the records;
    `callbacks`: added after segtrain's own and the config's.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, info: RunInfo | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.run_dir, self.info = cfg, Path(run_dir), info or RunInfo()
        self.extra_callbacks = list(callbacks)
        self.lock: RunLock | None = None
        self.run: Run | None = None
        self.callbacks = CallbackList([])

    def setup(self) -> Run:
        ctx = init_distributed(self.cfg.trainer.device)
        if not ctx.is_main:
            logging.getLogger("segtrain").setLevel(logging.WARNING)
        self.run_dir = Path(broadcast_object(str(self.run_dir), ctx))  # every rank uses rank 0's directory
        if ctx.is_main:  # before anything is written into the run directory
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
            prepare_run_directory(self.run_dir, self.cfg.get("resume"))
            log.info("run directory %s (checkpoints, train.log, config)", self.run_dir)
        trackers = configured_trackers(self.cfg)  # a missing package is said before any work
        if ctx.is_main and any(tracker.name == "tensorboard" for tracker in trackers):
            log.info("watch it: tensorboard --logdir %s", tensorboard_logdir(self.run_dir))
        self.callbacks = CallbackList([*default_callbacks(trackers), *configured_callbacks(self.cfg),
                                       *self.extra_callbacks])
        self.run = build_run(self.cfg, self.run_dir, ctx, self.info)
        self.run.callbacks = self.callbacks
        return self.run

    def resume(self) -> None:
        resume_run(self.run)

    # -- one iteration -------------------------------------------------------------------------

    def next_batches(self, data: object) -> list[Batch]:
        """One (images, masks) pair per accumulation pass; unusable samples are reported once each."""
        batches = []
        for _ in range(self.cfg.trainer.grad_accum_steps):
            batch = next(data)
            problems = [p for report in batch["skipped"] for p in report.split("\n") if p]
            self.run.state.skipped_samples += len(problems)
            self.run.report_problems(problems, "sample")
            batches.append((batch["image"], batch["mask"]))
        return batches

    def train_step(self, iteration: int, data: object) -> StepResult:
        run, t = self.run, self.cfg.trainer
        try:
            result = run.step(iteration, self.next_batches(data))
        except torch.OutOfMemoryError:
            raise TrainingStopped(
                f"out of GPU memory at iteration {iteration}: {run.micro_batch} images of "
                f"{list(self.cfg.dataset.augment.crop_size)} per pass (trainer.batch_size={t.batch_size}, "
                f"world size {run.ctx.world_size}, trainer.grad_accum_steps={t.grad_accum_steps}), "
                f"trainer.amp={run.runtime.amp}. Raise trainer.grad_accum_steps (same global batch, fewer images per "
                "pass), use trainer.amp=bf16, or a smaller dataset.augment.crop_size"
            ) from None
        run.state.iteration = iteration
        run.state.samples_seen += t.batch_size
        return result

    # -- the loop ------------------------------------------------------------------------------

    def build_loaders(self) -> object:
        """Loaders start at the resumed position of the training stream; returns its iterator."""
        run, t = self.run, self.cfg.trainer
        pin = run.runtime.device.type == "cuda"
        workers = train_worker_count(t.num_workers, int(self.cfg.dataset.get("workers_per_gpu", 4)))
        run.loader = train_loader(run.train_set, run.micro_batch, workers, t.seed, run.state.samples_seen,
                                  pin_memory=pin, rank=run.ctx.rank, world_size=run.ctx.world_size)
        run.val_loader = eval_loader(run.val_set, self.cfg.eval.batch_size, self.cfg.eval.num_workers, pin)
        return iter(run.loader)

    def fit(self) -> TrainResult:
        run, events, t = self.run, self.callbacks, self.cfg.trainer
        data = self.build_loaders()
        describe(run)
        set_train_mode(run)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(events.on_close, run)
            events.on_fit_start(run)
            if run.pending_validation is not None:  # a signal interrupted it before the checkpoint: redo it
                with run.throughput.excluded("validation"):
                    events.on_validation(run)
            for iteration in range(run.state.iteration + 1, run.max_iters + 1):
                if run.stop_reason is not None:  # asked at the end of the last iteration, or at on_fit_start
                    break
                last = iteration == run.max_iters
                result = self.train_step(iteration, data)
                events.on_step_end(run, result)
                if _due(iteration, self.cfg.logging.interval, last):
                    events.on_log(run, result)
                if _due(iteration, t.val_interval, last):  # it/s counts training steps only; the ETA adds these
                    with run.throughput.excluded("validation"):
                        events.on_validation(run)
                if _due(iteration, t.ckpt_interval, last or run.stop_reason is not None):
                    with run.throughput.excluded("checkpoint"):
                        events.on_checkpoint(run)
                events.on_iteration_end(run)
                if run.stop_signal is not None and run.stop_reason is None:  # a run that ends anyway just ends
                    self.preempt()
            if run.stop_reason is not None:
                log.info("stopped at iteration %d of %d: %s", run.state.iteration, run.max_iters, run.stop_reason)
            events.on_fit_end(run)
        barrier(run.ctx)
        return self.summary()

    def preempt(self) -> None:
        run = self.run
        self.callbacks.on_preempt(run)
        barrier(run.ctx)
        raise Preempted(
            f"stopped by {signal.Signals(run.stop_signal).name} after iteration {run.state.iteration}; checkpoint "
            f"{run.ckpt_dir / 'last.pt'}. Resume with the same command plus hydra.run.dir={run.run_dir} resume=auto",
            run.stop_signal,
        )

    def close(self) -> None:
        """Give the run directory back (the lock); safe after a failed setup."""
        if self.lock is not None:
            self.lock.release()

    def summary(self) -> TrainResult:
        run, s = self.run, self.run.state
        log.info("done: final val mIoU %s%%, best %s%% at iteration %d; checkpoints in %s", percent(s.last_miou),
                 percent(s.best_miou), s.best_iteration, run.ckpt_dir)
        skipped_val = len(run.validation.skipped) if run.validation is not None else 0
        if run.problems:
            log.warning("%d unusable training samples were skipped, %d validation samples left out of the final mIoU "
                        "(%d distinct problems; data.on_error=skip)", s.skipped_samples, skipped_val, len(run.problems))
        best = run.ckpt_dir / "best.pt"
        return TrainResult(run_dir=run.run_dir, best_miou=s.best_miou, best_iteration=s.best_iteration,
                           final_miou=s.last_miou, best_checkpoint=best if best.is_file() else None, model=run.model,
                           skipped=s.skipped_samples, skipped_steps=s.skipped_steps, skipped_val=skipped_val,
                           history=s.history)


def train(cfg: DictConfig, run_dir: Path, *, callbacks: Sequence[Callback] = (), run_info: RunInfo | None = None
          ) -> TrainResult:
    """Set up, resume if asked, and train; returns the summary (mIoU, checkpoints, loss history, model)."""
    trainer = Trainer(cfg, run_dir, run_info, callbacks)
    try:
        trainer.setup()
        trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()
