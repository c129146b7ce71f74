"""The training loop: a `Trainer` with explicit state (`TrainState`) and small named steps.

    trainer = Trainer(cfg, run_dir)
    trainer.setup()        # model, optimizer, schedule, loss (TrainStep), loaders, TensorBoard
    trainer.resume()       # weights, optimizer state, RNG and TrainState from a checkpoint
    trainer.fit()          # loop: step -> log -> validate -> save, until trainer.max_iters

`train(cfg, run_dir)` does all three. Runs alike in one process or under torchrun:
`trainer.batch_size` is the global batch, split over processes and accumulation steps, and the
loss is normalised over the whole global batch (segtrain.engine.losses). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from segtrain.config import check_options
from segtrain.data.loading import build_dataset, eval_loader, train_loader
from segtrain.data.normalization import normalization
from segtrain.engine.checkpoint import (
    CHECKPOINT_DIR,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng_state,
    resume_candidates,
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
from segtrain.engine.ema import WeightEma, ema_decay
from segtrain.engine.evaluate import evaluate
from segtrain.engine.hparams import METRIC_TAGS, hydra_run_info, run_hparams
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.init_from import InitReport, load_init_weights
from segtrain.engine.lock import RunLock
from segtrain.engine.logger import PROGRESS_RECORD, RunLogger, Throughput, console_above_bar, format_eta
from segtrain.engine.optim import load_optimizer_state
from segtrain.engine.preemption import PreemptionHandler
from segtrain.engine.report import format_table
from segtrain.engine.resume import (
    check_same_data,
    check_same_network,
    check_same_normalization,
    data_fingerprint,
    log_changes,
    stored_config,
)
from segtrain.engine.runtime import resolve_channels_last, seed_everything
from segtrain.engine.step import Batch, StepResult, TrainStep, build_train_step
from segtrain.engine.sweep import write_result
from segtrain.errors import ConfigError, Preempted, TrainingStopped, WeightsError
from segtrain.models import backbone_for_inference, build_model
from segtrain.progress import progress_enabled
from segtrain.visualize import denormalize, make_palette, panel
from segtrain.weights_file import nonfinite_tensor

log = logging.getLogger("segtrain.train")

StepCallback = Callable[[int, nn.Module], None]


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (with weights, optimizer, scaler and RNG)."""

    iteration: int = 0  # optimizer steps done
    samples_seen: int = 0  # position in the training stream: iteration x global batch
    best_miou: float = -1.0
    best_iteration: int = 0
    last_miou: float = math.nan
    skipped_steps: int = 0  # steps dropped for a non-finite loss (nan_policy=skip)
    skipped_samples: int = 0  # unusable samples replaced (data.on_error=skip), this process
    history: list[dict[str, float]] = field(default_factory=list)  # logged loss and lr (not saved)

    def to_checkpoint(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], saved_batch_size: int) -> TrainState:
        """`saved_batch_size`: the batch size the checkpoint was trained with, for checkpoints written
        before TrainState (their stream position is iteration x that batch size)."""
        saved = state.get("train_state") or {
            "iteration": state["iteration"], "best_miou": state["best_miou"],
            "skipped_steps": state.get("skipped_steps", 0)}
        known = {f.name for f in fields(cls)} - {"history"}
        restored = cls(**{k: v for k, v in saved.items() if k in known})
        if "samples_seen" not in saved:
            restored.samples_seen = restored.iteration * saved_batch_size
        return restored


def check_trainer_config(cfg: DictConfig) -> None:
    check_options(cfg)
    t = cfg.trainer
    for key in ("max_iters", "batch_size", "grad_accum_steps", "val_interval", "ckpt_interval", "keep_last"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {t[key]}")
    for key in ("interval", "image_interval"):
        if cfg.logging[key] < 1:
            raise ConfigError(f"logging.{key} must be >= 1, got {cfg.logging[key]}")
    for key, value in (("trainer.num_workers", t.num_workers), ("eval.num_workers", cfg.eval.num_workers),
                       ("trainer.seed", t.seed), ("trainer.max_skipped_steps", t.max_skipped_steps)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a finite number > 0, got {lr!r}")
    ema_decay(t.get("ema_decay"))
    if cfg.get("init_from") not in (None, "") and cfg.get("resume") not in (None, "", False, "auto"):
        raise ConfigError(f"init_from={cfg.init_from} and resume={cfg.resume}: give one. resume= continues a run "
                          "(weights, optimizer, iteration); init_from= starts a new run from a checkpoint's weights")


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _check_same_classes(state: dict, class_names: list[str], path: Path) -> None:
    saved = list(state.get("class_names", []))
    if saved != class_names:
        raise ConfigError(
            f"checkpoint {path} was trained for {len(saved)} classes {saved[:6]}..., but dataset "
            f"{len(class_names)} classes {class_names[:6]}...; resume with the dataset it was trained on, or start a "
            f"new run directory with init_from={path} to fine-tune its weights on this dataset"
        )


class Trainer:
    """Trains per `cfg`, writing checkpoints, TensorBoard events and metrics under `run_dir` (rank 0).

    `on_step(iteration, model)` is called after every optimizer step (tests, instrumentation).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, on_step: StepCallback | None = None) -> None:
        self.cfg, self.run_dir, self.on_step = cfg, Path(run_dir), on_step
        self.state = TrainState()
        self.problems: set[str] = set()  # distinct unusable-sample messages already logged
        self.lock: RunLock | None = None
        self.init_report: InitReport | None = None  # what init_from loaded and re-initialised

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        check_trainer_config(cfg)
        self.ctx: DistContext = init_distributed(t.device)
        self.device = self.ctx.device
        if not self.ctx.is_main:
            logging.getLogger("segtrain").setLevel(logging.WARNING)
        self.micro_batch = micro_batch_size(t.batch_size, self.ctx.world_size, t.grad_accum_steps)
        if (self.micro_batch < 2 and not t.freeze_bn
                and not should_sync_bn(t.sync_bn, self.ctx.world_size, self.device.type)):
            raise ConfigError(
                f"trainer.batch_size={t.batch_size} gives {self.micro_batch} image per process and step: BatchNorm "
                "needs at least 2 (raise trainer.batch_size, use fewer accumulation steps, or trainer.freeze_bn=true)"
            )
        self.run_dir = Path(broadcast_object(str(self.run_dir), self.ctx))  # every rank uses rank 0's directory
        if self.ctx.is_main:  # before anything is written into the run directory
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
            log.info("run directory %s (checkpoints, train.log, config)", self.run_dir)
            if cfg.logging.tensorboard:
                log.info("watch it: tensorboard --logdir %s", self.run_dir)
        seed_everything(t.seed, t.deterministic)
        self.class_names = list(cfg.dataset.class_names)
        self.normalize = normalization(cfg)
        log.info("images normalised with mean %s, std %s", self.normalize[0], self.normalize[1])
        self.train_set = build_dataset(cfg.dataset, cfg.dataset.train_split, train=True, normalize=self.normalize,
                                       on_error=cfg.data.on_error, max_pixels=cfg.data.max_image_pixels)
        self.fingerprint = data_fingerprint(self.train_set.samples, cfg.dataset.root)
        self.val_set = build_dataset(cfg.dataset, cfg.dataset.val_split, train=False, normalize=self.normalize,
                                     on_error=cfg.data.on_error, max_pixels=cfg.data.max_image_pixels)
        self.settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size)
        self.model = self.build_model()
        self.init_weights()
        decay = ema_decay(t.ema_decay)  # before DDP wraps the model
        self.ema = WeightEma(self.model, decay) if decay is not None else None
        self.val_model = self.build_val_model()
        self.step: TrainStep = build_train_step(cfg, self.model, self.ctx, len(self.class_names))
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.palette = make_palette(cfg.dataset.palette, len(self.class_names))
        self.metrics = RunLogger(self.run_dir, self.ctx.is_main, cfg.logging.tensorboard)  # opened by fit()
        self.best_on_disk = self.saved_best_miou()

    def saved_best_miou(self) -> float:
        """The mIoU of an existing best.pt: it is replaced only by a better one."""
        best = self.ckpt_dir / "best.pt"
        if not best.is_file():
            return -1.0
        try:
            return float(load_checkpoint(best)["best_miou"])
        except (WeightsError, KeyError, TypeError, ValueError):
            log.warning("%s does not load; the first validation replaces it", best)
            return -1.0

    def build_model(self) -> nn.Module:
        t = self.cfg.trainer
        model = build_model(self.cfg.model, self.cfg.backbone, len(self.class_names))
        crop = list(self.cfg.dataset.augment.crop_size)
        stride = max(getattr(getattr(model, "backbone", None), "strides", [1]))
        if min(crop) < stride:
            raise ConfigError(f"dataset.augment.crop_size={crop} is smaller than the network's output stride "
                              f"{stride}: choose a crop of at least {stride} pixels a side (the papers use 473-1024)")
        model = apply_sync_bn(model, t.sync_bn, self.ctx.world_size, self.device.type).to(self.device)
        if resolve_channels_last(t.channels_last, self.device):
            model = model.to(memory_format=torch.channels_last)
        return model

    def init_weights(self) -> None:
        """init_from: a checkpoint's weights, unless resume=auto finds this run's own checkpoints (they win)."""
        init_from = self.cfg.get("init_from")
        if init_from in (None, ""):
            return
        if self.cfg.get("resume") == "auto" and resume_candidates(self.run_dir):
            log.info("init_from=%s not applied: resume=auto continues this run's checkpoints in %s", init_from,
                     self.run_dir / CHECKPOINT_DIR)
            return
        self.init_report = load_init_weights(self.model, Path(str(init_from)), self.class_names)

    def build_val_model(self) -> nn.Module | None:
        """A copy of the network at eval.output_stride (e.g. 8 for a model trained at 16), which each
        validation loads the current weights into; None when validation uses the training network."""
        stride = self.cfg.eval.output_stride
        if stride is None or stride == self.cfg.backbone.get("output_stride"):
            return None
        model = build_model(self.cfg.model, backbone_for_inference(self.cfg.backbone, stride), len(self.class_names))
        model = model.to(self.device).eval()
        if resolve_channels_last(self.cfg.trainer.channels_last, self.device):
            model = model.to(memory_format=torch.channels_last)
        log.info("validation at output stride %s (training at %s)", stride, self.cfg.backbone.get("output_stride"))
        return model

    def build_loaders(self) -> None:
        """Loaders start at the resumed position of the training stream."""
        t, cfg = self.cfg.trainer, self.cfg
        pin = self.device.type == "cuda"
        self.loader = train_loader(self.train_set, self.micro_batch, t.num_workers, t.seed, self.state.samples_seen,
                                   pin_memory=pin, rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.val_loader = eval_loader(self.val_set, cfg.eval.batch_size, cfg.eval.num_workers, pin)
        self.data = iter(self.loader)

    # -- resume --------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore from `resume` (auto: this run directory's newest usable checkpoint, or a path)."""
        found = self.find_checkpoint()
        if found is None:
            return
        path, saved = found
        _check_same_classes(saved, self.class_names, path)
        stored = stored_config(saved, str(path))
        check_same_network(stored, self.cfg, str(path))
        check_same_normalization(stored, self.cfg, str(path))
        check_same_data(saved.get("data_fingerprint"), self.fingerprint, str(path))
        self.model.load_state_dict(saved["model"])
        self.load_ema(saved, path)
        self.load_update_state(saved, stored)
        restore_rng_state(saved["rng"])
        saved_batch = OmegaConf.select(stored, "trainer.batch_size", default=self.cfg.trainer.batch_size)
        self.state = TrainState.from_checkpoint(saved, int(saved_batch))
        log_changes(stored, self.cfg, self.state.iteration)
        log.info("resumed from %s at iteration %d (lr %.6g)", path, self.state.iteration,
                 self.step.lr(self.state.iteration + 1))

    def load_ema(self, saved: dict, path: Path) -> None:
        """The averaged weights, exactly as saved; a checkpoint without them starts the average at its weights."""
        if self.ema is None:
            if saved.get("ema"):
                log.warning("resume: %s holds averaged (EMA) weights but trainer.ema_decay is off: training continues "
                            "from its raw weights and later checkpoints hold no average", path)
        elif saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        else:
            self.ema.reset(self.model)
            log.info("resume: %s holds no averaged weights; the average (trainer.ema_decay=%g) starts from its "
                     "weights", path, self.ema.decay)

    def load_update_state(self, saved: dict, stored: DictConfig) -> None:
        """Optimizer state (momentum, moments) and the fp16 loss scale, where they still apply."""
        before = OmegaConf.select(stored, "optimizer._target_", default=None)
        now = self.cfg.optimizer._target_
        if before is not None and before != now:
            log.warning("resume: the optimizer changed (%s -> %s): its per-parameter state starts fresh", before, now)
        else:
            load_optimizer_state(self.step.optimizer, saved["optimizer"])
        if saved.get("scaler") and self.step.scaler.is_enabled():  # empty when saved without fp16
            self.step.scaler.load_state_dict(saved["scaler"])

    def find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        resume = self.cfg.get("resume")
        if resume in (None, "", False):
            return None
        if resume == "auto":
            found = find_resume_checkpoint(self.run_dir)
            if found is None:
                init_from = self.cfg.get("init_from")
                start = "from scratch" if init_from in (None, "") else f"from init_from={init_from}"
                log.info("resume=auto: no checkpoint in %s; starting %s", self.ckpt_dir, start)
            return found
        return Path(str(resume)), load_checkpoint(Path(str(resume)))

    # -- one iteration -------------------------------------------------------------------------

    def next_batches(self) -> list[Batch]:
        """One (images, masks) pair per accumulation pass; unusable samples are reported once each."""
        batches = []
        for _ in range(self.cfg.trainer.grad_accum_steps):
            batch = next(self.data)
            problems = [p for report in batch["skipped"] for p in report.split("\n") if p]
            self.state.skipped_samples += len(problems)
            self.report_problems(problems, "sample")
            batches.append((batch["image"], batch["mask"]))
        return batches

    def report_problems(self, problems: list[str], what: str) -> None:
        """Each distinct unusable-sample problem is logged once per run."""
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                log.warning("data.on_error=skip: skipping a %s: %s", what, problem)

    def train_step(self, iteration: int) -> StepResult:
        t = self.cfg.trainer
        try:
            return self.step(iteration, self.next_batches())
        except torch.OutOfMemoryError:
            raise TrainingStopped(
                f"out of GPU memory at iteration {iteration}: {self.micro_batch} images of "
                f"{list(self.cfg.dataset.augment.crop_size)} per pass (trainer.batch_size={t.batch_size}, "
                f"world size {self.ctx.world_size}, trainer.grad_accum_steps={t.grad_accum_steps}), "
                f"trainer.amp={self.step.amp}. Raise trainer.grad_accum_steps (same global batch, fewer images per "
                "pass), use trainer.amp=bf16, or a smaller dataset.augment.crop_size"
            ) from None

    def account_non_finite(self, iteration: int, result: StepResult) -> None:
        """nan_policy=skip: count and limit skipped steps. stop: remember the first bad iteration on
        the device (no host sync per step); `check_finite` raises at the next log or checkpoint."""
        t = self.cfg.trainer
        if not result.skipped:
            self.first_bad = torch.where((self.first_bad == 0) & ~result.finite, iteration, self.first_bad)
            return
        self.state.skipped_steps += 1
        lr = self.step.lr(iteration)
        log.warning("non-finite loss at iteration %d (lr %.6g): step skipped (%d of at most %d)",
                    iteration, lr, self.state.skipped_steps, t.max_skipped_steps)
        self.metrics.scalars(iteration, {"train/skipped_steps": self.state.skipped_steps})
        if self.state.skipped_steps > t.max_skipped_steps:
            raise TrainingStopped(
                f"{self.state.skipped_steps} steps had a non-finite loss (trainer.max_skipped_steps="
                f"{t.max_skipped_steps}); last at iteration {iteration} (lr {lr:.6g}). Last good checkpoint: "
                f"{self.last_good_checkpoint()}. Lower optimizer.lr or check the data (segtrain data check)"
            )

    def last_good_checkpoint(self) -> str:
        last = self.ckpt_dir / "last.pt"
        return str(last) if last.exists() else "none written yet"

    def check_finite(self) -> None:
        worst = self.first_bad.clone()
        if self.ctx.enabled:  # a NaN on any rank poisons every rank's weights through the gradient average
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        bad = int(worst)
        if bad:
            raise TrainingStopped(
                f"non-finite loss at iteration {bad} (lr {self.step.lr(bad):.6g}); "
                f"trainer.nan_policy=stop. Last good checkpoint: {self.last_good_checkpoint()}. Lower "
                "optimizer.lr, add schedule.warmup_iters, check the data with `segtrain data check`, or set "
                "trainer.nan_policy=skip"
            )

    # -- logging, validation, checkpoints ------------------------------------------------------

    @property
    def writer(self) -> Any:
        """TensorBoard's SummaryWriter for images and text (None when off, on other ranks, before fit)."""
        return self.metrics.writer

    def log_progress(self, iteration: int, result: StepResult) -> None:
        """Once per logging interval: the loop's only host synchronisation. The line always reaches
        train.log; on the console the bar shows it instead when there is one."""
        self.check_finite()
        lr = self.step.lr(iteration)
        loss = float(all_reduce_sum(result.loss, self.ctx)) / self.ctx.world_size  # the global batch's loss
        rate = self.speed.rate(iteration)  # over the iterations since the last line: the last window may be short
        self.state.history.append({"iteration": iteration, "loss": loss, "lr": lr})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        max_iters = self.cfg.trainer.max_iters
        log.info("iter %d/%d: loss %.4f, lr %.6g, %.2f it/s, eta %s", iteration, max_iters, loss, lr, rate,
                 format_eta((max_iters - iteration) / rate if rate > 0 else math.inf),
                 extra={PROGRESS_RECORD: True})
        values = {"train/loss": loss, "train/lr": lr, "train/iter_per_s": rate}
        if self.cfg.data.on_error == "skip":
            values["data/skipped_samples"] = self.state.skipped_samples
        self.metrics.scalars(iteration, values)

    def set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.trainer.freeze_bn:
            freeze_batchnorm(self.model)

    def validate(self, iteration: int, log_images: bool) -> float:
        """mIoU on the validation split; a new best is saved as best.pt."""
        evaluated = self.model if self.ema is None else self.ema.module  # with EMA on, only the average
        if self.ctx.enabled:  # without SyncBatchNorm each rank's running statistics drift; use rank 0's
            for buffer in evaluated.buffers():
                torch.distributed.broadcast(buffer, src=0)
        num_images = self.cfg.logging.num_images if log_images and self.ctx.is_main else 0
        model = evaluated
        if self.val_model is not None:  # the protocol's output stride: a copy of the evaluated weights
            self.val_model.load_state_dict(evaluated.state_dict())
            model = self.val_model
        with self.step.eager():  # images of varying size: never compile (nor recompile) the training graphs
            result = evaluate(model, self.val_loader, len(self.class_names), self.device, self.step.amp,
                              self.cfg.dataset.ignore_index, self.settings, num_examples=num_images)
        self.set_train_mode()
        m = result.metrics
        self.report_problems(result.skipped, "validation sample")
        left_out = f" ({len(result.skipped)} unusable samples left out: data.on_error=skip)" if result.skipped else ""
        log.info("iter %d: val mIoU %.4f, pixel acc %.4f, mean acc %.4f%s%s\n%s", iteration, m["miou"],
                 m["pixel_acc"], m["mean_acc"], "" if self.ema is None else " (EMA weights)", left_out,
                 format_table(m, self.class_names))
        self.write_validation(iteration, m, result.examples)
        self.state.last_miou = m["miou"]
        if m["miou"] > self.state.best_miou:
            self.state.best_miou, self.state.best_iteration = m["miou"], iteration
            if self.ctx.is_main and m["miou"] > self.best_on_disk:
                self.best_on_disk = m["miou"]
                save_checkpoint(self.checkpoint(), self.ckpt_dir / "best.pt")
                log.info("new best mIoU %.4f at iteration %d: %s", m["miou"], iteration, self.ckpt_dir / "best.pt")
        return m["miou"]

    def write_validation(self, iteration: int, metrics: dict, examples: list) -> None:
        """Scalars (val/best_mIoU: the best so far, an HParams metric) to TensorBoard and metrics.jsonl."""
        values = {tag: metrics[key] for key, tag in (("miou", "val/mIoU"), ("pixel_acc", "val/pixel_acc"),
                                                      ("mean_acc", "val/mean_acc"))}
        values["val/best_mIoU"] = max(self.state.best_miou, metrics["miou"])
        values.update({f"val_iou/{name}": iou for name, iou in zip(self.class_names, metrics["iou"])
                       if not math.isnan(iou)})
        self.metrics.scalars(iteration, values)
        if self.writer is None:
            return
        for k, (image, mask, pred) in enumerate(examples):
            rgb = denormalize(image, *self.normalize)
            self.writer.add_image(f"val_images/{k}", panel(rgb, mask, pred, self.palette), iteration, dataformats="HWC")

    def checkpoint(self) -> dict[str, Any]:
        """Everything a resume needs. The schedule is not in it: the learning rate is a function of
        the configuration and the iteration. A state with NaN or infinity in a parameter or buffer
        (e.g. BatchNorm statistics) is never saved."""
        weights = self.model.state_dict()
        averaged = self.ema.state_dict() if self.ema is not None else {}
        bad = nonfinite_tensor(weights)
        if bad is None and nonfinite_tensor(averaged) is not None:
            bad = f"the averaged (EMA) weights' {nonfinite_tensor(averaged)}"
        if bad is not None:
            raise TrainingStopped(
                f"non-finite values (NaN or infinity) in {bad} at iteration {self.state.iteration}: not saved. Last "
                f"good checkpoint: {self.last_good_checkpoint()}. Lower optimizer.lr, add schedule.warmup_iters or "
                "check the data with `segtrain data check`"
            )
        extra = {"ema": averaged} if self.ema is not None else {}
        return {
            "model": weights,
            **extra,
            "optimizer": self.step.optimizer.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "train_state": self.state.to_checkpoint(),
            "iteration": self.state.iteration,
            "best_miou": self.state.best_miou,
            "skipped_steps": self.state.skipped_steps,
            "rng": rng_state(),
            "class_names": self.class_names,
            "data_fingerprint": self.fingerprint,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }

    def save(self) -> Path | None:
        """A periodic checkpoint (iter_N.pt, last.pt); never of a state reached through a non-finite loss."""
        self.check_finite()
        if self.ctx.is_main:
            return save_periodic(self.checkpoint(), self.ckpt_dir, self.cfg.trainer.keep_last)
        return None

    def stop_if_preempted(self, iteration: int, saved: Path | None) -> None:
        stop = self.preemption.requested
        if self.ctx.enabled:  # every rank must stop at the same step
            stop = bool(all_reduce_sum(torch.tensor(float(stop), device=self.device), self.ctx) > 0)
        if not stop or iteration >= self.cfg.trainer.max_iters:
            return
        if saved is None:
            self.save()
        barrier(self.ctx)
        signum = self.preemption.signum or signal.SIGTERM
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} after iteration {iteration}; checkpoint "
            f"{self.ckpt_dir / 'last.pt'}. Resume with the same command plus hydra.run.dir={self.run_dir} resume=auto",
            signum,
        )

    # -- the loop ------------------------------------------------------------------------------

    def describe(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        model = self.model
        log.info(
            "model %s + %s: %.2fM parameters; loss %s; %d train / %d val images; effective (global) batch %d = %d "
            "per pass x accumulation %d x world size %d; device %s, amp %s, channels_last %s, compile %s%s%s",
            cfg.model._target_.rsplit(".", 1)[-1], cfg.backbone.get("name", cfg.backbone._target_),
            sum(p.numel() for p in model.parameters()) / 1e6, type(self.step.loss).__name__, len(self.train_set),
            len(self.val_set), t.batch_size, self.micro_batch, t.grad_accum_steps, self.ctx.world_size, self.device,
            self.step.amp, self.step.memory_format == torch.channels_last, bool(t.compile),
            ", SyncBatchNorm" if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) else "",
            f", EMA of weights (decay {self.ema.decay:g}; validation uses it)" if self.ema is not None else "",
        )

    def run_iteration(self, iteration: int) -> None:
        t, interval = self.cfg.trainer, self.cfg.logging.interval
        last = iteration == t.max_iters
        result = self.train_step(iteration)
        self.account_non_finite(iteration, result)
        if self.ema is not None and not result.skipped:
            self.ema.update(self.model)
        self.state.iteration = iteration
        self.state.samples_seen += t.batch_size
        self.bar.update(1)
        if self.on_step is not None:
            self.on_step(iteration, self.model)
        if iteration % interval == 0 or last:
            self.log_progress(iteration, result)
        with self.speed.excluded():  # it/s counts training steps only
            if iteration % t.val_interval == 0 or last:
                self.check_finite()
                image_interval = self.cfg.logging.image_interval
                images_due = iteration // image_interval > self.last_images or last
                self.validate(iteration, images_due)
                if images_due:
                    self.last_images = iteration // image_interval
            self.metrics.end_step()  # this iteration's metrics.jsonl line
            saved = self.save() if iteration % t.ckpt_interval == 0 or last else None
        self.stop_if_preempted(iteration, saved)

    def fit(self) -> dict:
        t = self.cfg.trainer
        self.build_loaders()
        self.describe()
        self.set_train_mode()
        self.show_progress = progress_enabled(self.cfg.logging.progress) and self.ctx.is_main
        self.bar = tqdm(total=t.max_iters, initial=self.state.iteration, desc="train", unit="it",
                        disable=not self.show_progress, dynamic_ncols=True)
        self.last_images = self.state.iteration // self.cfg.logging.image_interval
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        self.speed = Throughput(self.state.iteration)
        with PreemptionHandler() as self.preemption, contextlib.ExitStack() as cleanup:
            cleanup.enter_context(console_above_bar(self.show_progress))
            cleanup.callback(self.bar.close)
            cleanup.callback(self.metrics.close)  # TensorBoard and metrics.jsonl flushed on any exit
            self.start_records()
            for iteration in range(self.state.iteration + 1, t.max_iters + 1):
                self.run_iteration(iteration)
            self.metrics.end_session(self.state.iteration)
        barrier(self.ctx)
        return self.summary()

    def start_records(self) -> None:
        """metrics.jsonl and TensorBoard from the start iteration; the HParams entry and the config."""
        self.metrics.open(self.state.iteration)
        self.run_info = hydra_run_info()
        self.hparams = run_hparams(self.cfg, self.run_info.overrides, self.run_info.choices)
        self.metrics.start_session(self.hparams, list(METRIC_TAGS), OmegaConf.to_yaml(self.cfg, resolve=True),
                                   self.state.iteration)

    def close(self) -> None:
        """Give the run directory back (the lock); safe after a failed setup."""
        if self.lock is not None:
            self.lock.release()

    def summary(self) -> dict:
        s = self.state
        log.info("done: final val mIoU %.4f, best %.4f at iteration %d; checkpoints in %s", s.last_miou, s.best_miou,
                 s.best_iteration, self.ckpt_dir)
        if self.problems:
            log.warning("%d unusable samples were skipped (%d distinct problems)", s.skipped_samples,
                        len(self.problems))
        if self.ctx.is_main:
            write_result(self.run_dir, {
                "best_miou": s.best_miou, "best_iteration": s.best_iteration, "final_miou": s.last_miou,
                "iteration": s.iteration, "max_iters": self.cfg.trainer.max_iters, "job": self.run_info.job,
                "overrides": self.run_info.overrides, "hparams": self.hparams, "run_dir": str(self.run_dir)})
        return {"final_miou": s.last_miou, "best_miou": s.best_miou, "history": s.history, "model": self.model,
                "skipped": s.skipped_samples, "skipped_steps": s.skipped_steps}


def train(cfg: DictConfig, run_dir: Path, on_step: StepCallback | None = None) -> dict:
    """Set up, resume if asked, and train; returns the summary (mIoU, loss history, model)."""
    trainer = Trainer(cfg, run_dir, on_step)
    try:
        trainer.setup()
        trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()
