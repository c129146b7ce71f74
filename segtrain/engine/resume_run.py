"""Continue a run from a checkpoint (`resume=auto` or `resume=PATH`): weights, the averaged weights,
optimizer and loss-scale state, RNG and `TrainState`, after checking that the checkpoint belongs to
this run (classes, network, normalisation, data; segtrain.engine.resume)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segtrain.engine.checkpoint import (
    CHECKPOINT_DIR,
    find_resume_checkpoint,
    held_checkpoints,
    load_checkpoint,
    remove_temporary_files,
    restore_rng_state,
)
from segtrain.engine.optim import load_optimizer_state
from segtrain.engine.resume import (
    check_same_data,
    check_same_network,
    check_same_normalization,
    log_changes,
    stored_config,
)
from segtrain.engine.run import Run, TrainState
from segtrain.errors import ConfigError, WeightsError

log = logging.getLogger("segtrain.train")


def _check_same_classes(state: dict, class_names: list[str], path: Path) -> None:
    saved = list(state.get("class_names", []))
    if saved != class_names:
        raise ConfigError(
            f"checkpoint {path} was trained for {len(saved)} classes {saved[:6]}..., but dataset "
            f"{len(class_names)} classes {class_names[:6]}...; resume with the dataset it was trained on, or start a "
            f"new run directory with init_from={path} to fine-tune its weights on this dataset"
        )


def prepare_run_directory(run_dir: Path, resume: Any) -> None:
    """With the run directory's lock held, before anything (data included) is touched: remove what
    killed writers left (partial checkpoint writes), and refuse a new run (resume=null) in a directory
    that holds another run's checkpoints, which the new run's would be mixed with."""
    remove_temporary_files(run_dir / CHECKPOINT_DIR)
    held = held_checkpoints(run_dir)
    if resume in (None, "", False) and held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds another run's checkpoints ({shown}) and resume=null starts a new run: "
            "continue that run with resume=auto, or choose a new directory (hydra.run.dir)"
        )


def find_checkpoint(run: Run) -> tuple[Path, dict[str, Any]] | None:
    resume = run.cfg.get("resume")
    if resume in (None, "", False):
        return None
    if resume == "auto":
        found = find_resume_checkpoint(run.run_dir)
        if found is None:
            init_from = run.cfg.get("init_from")
            start = "from scratch" if init_from in (None, "") else f"from init_from={init_from}"
            log.info("resume=auto: no checkpoint in %s; starting %s", run.ckpt_dir, start)
        return found
    return Path(str(resume)), load_checkpoint(Path(str(resume)))


def _load_ema(run: Run, saved: dict, path: Path) -> None:
    """The averaged weights, exactly as saved; a checkpoint without them starts the average at its weights."""
    if run.ema is None:
        if saved.get("ema"):
            log.warning("resume: %s holds averaged (EMA) weights but trainer.ema_decay is off: training continues "
                        "from its raw weights and later checkpoints hold no average", path)
    elif saved.get("ema"):
        run.ema.load_state_dict(saved["ema"])
    else:
        run.ema.reset(run.model)
        log.info("resume: %s holds no averaged weights; the average (trainer.ema_decay=%g) starts from its "
                 "weights", path, run.ema.decay)


def _load_update_state(run: Run, saved: dict, stored: DictConfig) -> None:
    """Optimizer state (momentum, moments) and the fp16 loss scale, where they still apply."""
    before = OmegaConf.select(stored, "optimizer._target_", default=None)
    now = run.cfg.optimizer._target_
    if before != now:
        log.warning("resume: the optimizer changed (%s -> %s): its per-parameter state starts fresh", before, now)
    else:
        load_optimizer_state(run.step.optimizer, saved["optimizer"])
    if saved.get("scaler") and run.step.scaler.is_enabled():  # empty when saved without fp16
        run.step.scaler.load_state_dict(saved["scaler"])


def _refuse_finished(iteration: object, run: Run, path: Path) -> None:
    """A run already past trainer.max_iters has nothing to train; going on would report iteration N of a
    smaller M (result.json included). At exactly max_iters the finished run reports itself again."""
    if isinstance(iteration, int) and not isinstance(iteration, bool) and iteration > run.max_iters:
        raise ConfigError(
            f"trainer.max_iters={run.max_iters}: the run in {run.run_dir} already finished {iteration} iterations "
            f"({path}); nothing to train. Give trainer.max_iters above {iteration} to continue it, or choose a new "
            "directory"
        )


def resume_run(run: Run) -> None:
    """Restore `run` from `resume` (auto: this run directory's newest usable checkpoint, or a path)."""
    found = find_checkpoint(run)
    if found is None:
        return
    path, saved = found
    if not isinstance(saved.get("train_state"), dict) or not isinstance(saved.get("rng"), dict):
        raise WeightsError(f"{path} cannot be resumed: it has no 'train_state' or 'rng' (a segtrain training "
                           f"checkpoint has both); start a new run with init_from={path} to use its weights")
    _check_same_classes(saved, run.class_names, path)
    stored = stored_config(saved, str(path))
    check_same_network(stored, run.cfg, str(path))
    check_same_normalization(stored, run.cfg, str(path))
    check_same_data(saved.get("data_fingerprint"), run.fingerprint, str(path))
    _refuse_finished(saved["train_state"].get("iteration"), run, path)
    run.model.load_state_dict(saved["model"])
    if isinstance(saved.get("run_id"), str):  # a checkpoint from before run ids: the run takes a new one
        run.run_id = saved["run_id"]
    _load_ema(run, saved, path)
    _load_update_state(run, saved, stored)
    restore_rng_state(saved["rng"])
    run.state = TrainState.from_checkpoint(saved["train_state"])
    if run.callbacks is not None and isinstance(saved.get("callbacks"), dict):
        run.callbacks.load_state_dict(saved["callbacks"])
    log_changes(stored, run.cfg, run.state.iteration)
    log.info("resumed from %s at iteration %d (lr %.6g)", path, run.state.iteration,
             run.step.lr(run.state.iteration + 1))
