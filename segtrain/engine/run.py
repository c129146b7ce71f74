"""What a training run is made of: `Run`, the one object the loop and its callbacks share.

`build_run(cfg, run_dir)` makes it: the process group and the runtime, the datasets, the network
(with its EMA copy and validation copy), the training step, and the records (metrics.jsonl and the
experiment trackers, which join them when they start). Everything a callback may read or change is a
field here; nothing lives in closures or in attributes created later.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segtrain.data.loading import build_dataset
from segtrain.data.normalization import normalization
from segtrain.engine.checkpoint import CHECKPOINT_DIR, nonfinite_tensor, resume_candidates, rng_state
from segtrain.engine.distributed import DistContext, apply_sync_bn, micro_batch_size, should_sync_bn
from segtrain.engine.ema import WeightEma, ema_decay
from segtrain.engine.hparams import RunInfo
from segtrain.engine.init_from import InitReport, load_init_weights
from segtrain.engine.logger import RunLogger, Throughput
from segtrain.engine.preemption import PreemptionHandler
from segtrain.engine.resume import data_fingerprint, recorded_fingerprint
from segtrain.engine.runtime import Runtime, resolve_runtime, seed_everything
from segtrain.engine.step import TrainStep, build_train_step
from segtrain.errors import ConfigError, TrainingStopped
from segtrain.keys import given_keys
from segtrain.models import backbone_for_inference, build_model
from segtrain.models.backbones.base import RANDOM_INIT

log = logging.getLogger("segtrain.train")


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
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """From a checkpoint's `train_state`; a key this version does not know is left out."""
        known = set(cls.__dataclass_fields__) - {"history"}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class Validation:
    """One validation's outcome: metrics (miou, pixel_acc, mean_acc, per-class iou/acc) at an iteration."""

    iteration: int
    metrics: dict[str, Any]
    examples: list = field(default_factory=list)  # (image, mask, prediction) arrays for the trackers
    skipped: list[str] = field(default_factory=list)  # problems of unusable samples left out (data.on_error=skip)


@dataclass
class Run:
    """The state of one training run, shared by the loop and its callbacks."""

    cfg: DictConfig
    run_dir: Path
    ctx: DistContext
    runtime: Runtime
    info: RunInfo
    class_names: list[str]
    normalize: tuple[list[float], list[float]]
    train_set: Dataset
    val_set: Dataset
    fingerprint: dict[str, Any]  # the training set (resume checks it)
    val_fingerprint: dict[str, Any]  # the validation images (eval compares with the recorded mIoU only on them)
    micro_batch: int
    model: nn.Module
    ema: WeightEma | None
    val_model: nn.Module | None  # the network at eval.output_stride, when it differs from training's
    step: TrainStep
    records: RunLogger
    state: TrainState = field(default_factory=TrainState)
    init_report: InitReport | None = None  # what init_from loaded and re-initialised
    loader: DataLoader | None = None  # built by fit(), at the resumed position of the stream
    val_loader: DataLoader | None = None
    throughput: Throughput = field(default_factory=lambda: Throughput(0))
    problems: set[str] = field(default_factory=set)  # distinct unusable-sample messages already logged
    validation: Validation | None = None  # the latest validation
    last_checkpoint: Path | None = None  # the latest periodic checkpoint (rank 0)
    stop_signal: int | None = None  # set when every rank agreed to stop (preemption)
    preemption: PreemptionHandler | None = None  # the fit's signal handler: validation asks it between batches
    # The iteration whose validation a signal interrupted: redone first thing after resume.
    pending_validation: int | None = None
    validation_interrupted: bool = False  # during on_validation: the callbacks after the validation skip it
    # Set by a callback (the same on every rank) to end the run after this iteration as a normal finish:
    # the loop checkpoints the iteration, logs the reason and runs on_fit_end (early stopping).
    stop_reason: str | None = None
    callbacks: Any = None  # the loop's CallbackList (set by the Trainer): their states go into checkpoints
    # Written into every checkpoint: pruning and resume=auto touch only this run's files. A resumed run
    # takes its checkpoint's.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def max_iters(self) -> int:
        return int(self.cfg.trainer.max_iters)

    @property
    def evaluated_model(self) -> nn.Module:
        """What validation measures and best.pt is judged by: the averaged weights when EMA is on."""
        return self.model if self.ema is None else self.ema.module

    def report_problems(self, problems: list[str], what: str) -> None:
        """Each distinct unusable-sample problem is logged once per run."""
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                log.warning("data.on_error=skip: skipping a %s: %s", what, problem)

    def last_good_checkpoint(self) -> str:
        last = self.ckpt_dir / "last.pt"
        return str(last) if last.exists() else "none written yet"


def _network(cfg: DictConfig, backbone: DictConfig, num_classes: int, ctx: DistContext, runtime: Runtime) -> nn.Module:
    model = build_model(cfg.model, backbone, num_classes)
    model = apply_sync_bn(model, cfg.trainer.sync_bn, ctx.world_size, runtime.device.type)
    return model.to(runtime.device, memory_format=runtime.memory_format)


def _check_crop(cfg: DictConfig, model: nn.Module) -> None:
    crop = list(cfg.dataset.augment.crop_size)
    stride = max(getattr(getattr(model, "backbone", None), "strides", [1]))
    if min(crop) < stride:
        raise ConfigError(f"dataset.augment.crop_size={crop} is smaller than the network's output stride "
                          f"{stride}: choose a crop of at least {stride} pixels a side (the papers use 473-1024)")


def _validation_network(cfg: DictConfig, num_classes: int, runtime: Runtime) -> nn.Module | None:
    """A copy of the network at eval.output_stride (e.g. 8 for a model trained at 16), which each
    validation loads the current weights into; None when validation uses the training network."""
    stride = cfg.eval.output_stride
    if stride is None or stride == cfg.backbone.get("output_stride"):
        return None
    model = build_model(cfg.model, backbone_for_inference(cfg.backbone, stride), num_classes)
    log.info("validation at output stride %s (training at %s)", stride, cfg.backbone.get("output_stride"))
    return model.to(runtime.device, memory_format=runtime.memory_format).eval()


def _init_weights(cfg: DictConfig, model: nn.Module, run_dir: Path, class_names: list[str]) -> InitReport | None:
    """init_from: a checkpoint's weights, unless resume=auto finds this run's own checkpoints (they win)."""
    init_from = cfg.get("init_from")
    if init_from in (None, ""):
        return None
    if cfg.get("resume") == "auto" and resume_candidates(run_dir):
        log.info("init_from=%s not applied: resume=auto continues this run's checkpoints in %s", init_from,
                 run_dir / CHECKPOINT_DIR)
        return None
    return load_init_weights(model, Path(str(init_from)), class_names)


def _micro_batch(cfg: DictConfig, ctx: DistContext, runtime: Runtime) -> int:
    t = cfg.trainer
    micro = micro_batch_size(t.batch_size, ctx.world_size, t.grad_accum_steps)
    if micro < 2 and not t.freeze_bn and not should_sync_bn(t.sync_bn, ctx.world_size, runtime.device.type):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} gives {micro} image per process and step: BatchNorm "
            "needs at least 2 (raise trainer.batch_size, use fewer accumulation steps, or trainer.freeze_bn=true)"
        )
    return micro


def build_run(cfg: DictConfig, run_dir: Path, ctx: DistContext, info: RunInfo) -> Run:
    """Everything a run needs, in dependency order, for this process (`ctx`) of the run in `run_dir`."""
    t = cfg.trainer
    runtime = resolve_runtime(t, ctx.device)
    micro = _micro_batch(cfg, ctx, runtime)
    seed_everything(t.seed, t.deterministic)
    class_names = list(cfg.dataset.class_names)
    normalize = normalization(cfg)
    log.info("images normalised with mean %s, std %s", normalize[0], normalize[1])
    datasets = [build_dataset(cfg.dataset, split, train=train, normalize=normalize, on_error=cfg.data.on_error,
                              max_pixels=cfg.data.max_image_pixels, max_samples=limit)
                for split, train, limit in ((cfg.dataset.train_split, True, None),
                                            (cfg.dataset.val_split, False, t.get("val_max_images")))]
    if t.get("val_max_images") is not None:
        log.info("validation on the first %d images of split '%s' (trainer.val_max_images=%d)", len(datasets[1]),
                 cfg.dataset.val_split, t.val_max_images)
    model = _network(cfg, cfg.backbone, len(class_names), ctx, runtime)
    _check_crop(cfg, model)
    init_report = _init_weights(cfg, model, run_dir, class_names)
    decay = ema_decay(t.ema_decay)  # the average starts from the initial weights, before DDP wraps the model
    return Run(
        cfg=cfg, run_dir=run_dir, ctx=ctx, runtime=runtime, info=info, class_names=class_names,
        normalize=normalize, train_set=datasets[0], val_set=datasets[1],
        fingerprint=data_fingerprint(datasets[0].samples, cfg.dataset.root),
        val_fingerprint=data_fingerprint(datasets[1].samples, cfg.dataset.root), micro_batch=micro, model=model,
        ema=WeightEma(model, decay) if decay is not None else None,
        val_model=_validation_network(cfg, len(class_names), runtime),
        step=build_train_step(cfg, model, ctx, runtime, len(class_names), given_keys(info.overrides)),
        records=RunLogger(run_dir, ctx.is_main), init_report=init_report,
    )


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything a resume needs. The schedule is not in it: the learning rate is a function of
    the configuration and the iteration. A state with NaN or infinity in a parameter or buffer
    (e.g. BatchNorm statistics) is never saved."""
    weights = run.model.state_dict()
    averaged = run.ema.state_dict() if run.ema is not None else {}
    bad = nonfinite_tensor(weights)
    if bad is None and nonfinite_tensor(averaged) is not None:
        bad = f"the averaged (EMA) weights' {nonfinite_tensor(averaged)}"
    if bad is not None:
        raise TrainingStopped(
            f"non-finite values (NaN or infinity) in {bad} at iteration {run.state.iteration}: not saved. Last "
            f"good checkpoint: {run.last_good_checkpoint()}. Lower optimizer.lr, add schedule.warmup_iters or "
            "check the data with `segtrain data check`"
        )
    return {
        "run_id": run.run_id,
        "model": weights,
        **({"ema": averaged} if run.ema is not None else {}),
        "optimizer": run.step.optimizer.state_dict(),
        "scaler": run.step.scaler.state_dict(),
        "train_state": run.state.to_checkpoint(),
        "callbacks": run.callbacks.state_dict() if run.callbacks is not None else {},
        "rng": rng_state(),
        "class_names": run.class_names,
        "data_fingerprint": recorded_fingerprint(run.fingerprint),
        "val_data_fingerprint": recorded_fingerprint(run.val_fingerprint),
        "config": OmegaConf.to_yaml(run.cfg, resolve=True),
    }


def set_train_mode(run: Run) -> None:
    """Training mode, with BatchNorm kept in eval mode under trainer.freeze_bn."""
    run.model.train()
    if run.cfg.trainer.freeze_bn:
        for module in run.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def weights_origin(run: Run) -> str:
    """Where the weights training starts from: a resumed checkpoint, init_from, else the backbone's own
    origin (a file, ImageNet weights by tag, or random initialisation; the head is always initialised)."""
    if run.state.iteration > 0:
        return f"weights of the resumed checkpoint at iteration {run.state.iteration}"
    if run.init_report is not None:
        return f"weights from init_from={run.init_report.path}"
    return str(getattr(getattr(run.model, "backbone", None), "weights_origin", RANDOM_INIT))


def describe(run: Run) -> None:
    cfg, t = run.cfg, run.cfg.trainer
    model, step = run.model, run.step
    log.info(
        "model %s + %s (%s): %.2fM parameters; loss %s; %d train / %d val images; effective (global) batch %d = %d "
        "per pass x accumulation %d x world size %d; device %s, amp %s, channels_last %s, compile %s%s%s",
        cfg.model._target_.rsplit(".", 1)[-1], cfg.backbone.get("name", cfg.backbone._target_), weights_origin(run),
        sum(p.numel() for p in model.parameters()) / 1e6, type(step.loss).__name__, len(run.train_set),
        len(run.val_set), t.batch_size, run.micro_batch, t.grad_accum_steps, run.ctx.world_size, run.runtime.device,
        run.runtime.amp, run.runtime.channels_last, run.runtime.compile,
        ", SyncBatchNorm" if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) else "",
        f", EMA of weights (decay {run.ema.decay:g}; validation uses it)" if run.ema is not None else "",
    )

