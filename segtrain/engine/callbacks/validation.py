"""Validation at the protocol of `eval.*`, its report (log, the trackers, metrics.jsonl) and best.pt.

The measured network is the averaged one when EMA is on, at eval.output_stride when that differs
from training's (a copy that takes the current weights). best.pt is replaced only by a better
mIoU than the one already on disk, so a restarted run never overwrites a better model.

A signal (SIGTERM, Ctrl-C) during validation ends it at the next batch: nothing is reported or kept,
the callbacks after this one do not see the event (`run.pending_validation` is set), the loop
checkpoints and exits, and the resumed run redoes that validation before its first step.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from segtrain.display import percent
from segtrain.engine.callbacks.base import Callback
from segtrain.engine.checkpoint import load_checkpoint, save_checkpoint
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.report import class_table, write_class_csv
from segtrain.engine.run import Run, Validation, checkpoint_state, set_train_mode
from segtrain.errors import WeightsError
from segtrain.visualize import denormalize, make_palette, panel

log = logging.getLogger("segtrain.train")

CLASS_ROWS = 30  # above this many classes the log shows a summary and the full table goes to VAL_CLASS_CSV
VAL_CLASS_CSV = "val_per_class.csv"  # the latest validation's per-class IoU and accuracy


def saved_best_miou(run: Run) -> float:
    """The mIoU of an existing best.pt (-1 when there is none or it does not load)."""
    best = run.ckpt_dir / "best.pt"
    if not best.is_file():
        return -1.0
    try:
        return float(load_checkpoint(best)["train_state"]["best_miou"])
    except (WeightsError, KeyError, TypeError, ValueError):
        log.warning("%s does not load; the first validation replaces it", best)
        return -1.0


class ValidateAndKeepBest(Callback):
    def __init__(self) -> None:
        self.best_on_disk = -1.0
        self.images_written = 0  # image_interval periods already shown in TensorBoard

        self.pending: int | None = None  # restored from a checkpoint: the validation a signal interrupted

    def on_fit_start(self, run: Run) -> None:
        self.best_on_disk = saved_best_miou(run) if run.ctx.is_main else -1.0
        self.images_written = run.state.iteration // run.cfg.logging.image_interval
        if self.pending is not None and self.pending == run.state.iteration:
            run.pending_validation = self.pending  # the loop redoes it before the first step
        self.pending = None

    def state_dict(self) -> dict:
        return {} if self.pending is None else {"pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        pending = state.get("pending")
        self.pending = pending if isinstance(pending, int) and not isinstance(pending, bool) else None

    def on_validation(self, run: Run) -> None:
        iteration, interval = run.state.iteration, run.cfg.logging.image_interval
        show_images = (iteration // interval > self.images_written or iteration == run.max_iters)
        validation = self.validate(run, show_images)
        if validation is None:  # a signal: checkpoint now, validate again after resume
            self.pending = run.pending_validation = iteration
            run.validation_interrupted = True
            log.warning("validation of iteration %d interrupted by %s: it is redone after resume", iteration,
                        run.preemption.signal_name if run.preemption is not None else "a signal")
            return
        self.pending = run.pending_validation = None
        if show_images:
            self.images_written = iteration // interval
        run.validation = validation
        self.report(run, validation)
        miou = validation.metrics["miou"]
        run.state.last_miou = miou
        if miou > run.state.best_miou:
            run.state.best_miou, run.state.best_iteration = miou, iteration
            if run.ctx.is_main and miou > self.best_on_disk:
                self.best_on_disk = miou
                save_checkpoint(checkpoint_state(run), run.ckpt_dir / "best.pt")
                log.info("new best mIoU %s%% at iteration %d: %s", percent(miou), iteration, run.ckpt_dir / "best.pt")

    def validate(self, run: Run, show_images: bool) -> Validation | None:
        """The validation's outcome; None when a signal interrupted it."""
        evaluated = run.evaluated_model
        if run.ctx.enabled:  # without SyncBatchNorm each rank's running statistics drift; use rank 0's
            for buffer in evaluated.buffers():
                torch.distributed.broadcast(buffer, src=0)
        model = evaluated
        if run.val_model is not None:  # the protocol's output stride: a copy of the evaluated weights
            run.val_model.load_state_dict(evaluated.state_dict())
            model = run.val_model
        settings = InferenceSettings.from_config(run.cfg.eval, run.cfg.dataset.augment.crop_size,
                                                 run.cfg.dataset.get("flip_pairs"))
        drawn = show_images and run.ctx.is_main and run.records.takes_images  # no tracker takes images: none
        num_images = run.cfg.logging.num_images if drawn else 0
        log.info("iter %d: validating on %d images (scales %s, flip %s)", run.state.iteration, len(run.val_set),
                 list(settings.scales), settings.flip)
        with run.step.eager():  # images of varying size: never compile (nor recompile) the training graphs
            result = evaluate(model, run.val_loader, len(run.class_names), run.runtime.device, run.runtime.amp,
                              run.cfg.dataset.ignore_index, settings, num_examples=num_images,
                              stop_requested=None if run.preemption is None else lambda: run.preemption.requested)
        set_train_mode(run)
        if result.interrupted:
            return None
        run.report_problems(result.skipped, "validation sample")
        return Validation(run.state.iteration, result.metrics, result.examples, result.skipped)

    def report(self, run: Run, validation: Validation) -> None:
        """The log line and class table; scalars (val/best_mIoU: the best so far) and example images."""
        m, iteration = validation.metrics, validation.iteration
        table_csv = None
        if len(run.class_names) > CLASS_ROWS and run.ctx.is_main:  # the console gets a summary, the file all rows
            table_csv = write_class_csv(run.run_dir / VAL_CLASS_CSV, m, run.class_names)
        left_out = (f" ({len(validation.skipped)} unusable samples left out: data.on_error=skip)"
                    if validation.skipped else "")
        log.info("iter %d: val mIoU %s%%, pixel acc %s%%, mean acc %s%%%s%s\n%s", iteration, percent(m["miou"]),
                 percent(m["pixel_acc"]), percent(m["mean_acc"]), "" if run.ema is None else " (EMA weights)", left_out,
                 class_table(m, run.class_names, CLASS_ROWS, csv_path=table_csv))
        values = {tag: m[key] for key, tag in (("miou", "val/mIoU"), ("pixel_acc", "val/pixel_acc"),
                                               ("mean_acc", "val/mean_acc"))}
        values["val/best_mIoU"] = max(run.state.best_miou, m["miou"])
        values.update({f"val_iou/{name}": iou for name, iou in zip(run.class_names, m["iou"]) if not math.isnan(iou)})
        run.records.scalars(iteration, values)
        if not run.records.takes_images or not validation.examples:
            return
        palette = make_palette(run.cfg.dataset.palette, len(run.class_names))
        for k, (image, mask, pred) in enumerate(validation.examples):
            rgb = image.transpose(1, 2, 0) if image.dtype == np.uint8 else denormalize(image, *run.normalize)
            run.records.image(f"val_images/{k}", panel(rgb, mask, pred, palette, run.class_names), iteration)
