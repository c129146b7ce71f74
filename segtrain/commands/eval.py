"""`segtrain eval ckpt=PATH`: score a split with the network the checkpoint rebuilds (segtrain.engine.restore)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from omegaconf import DictConfig

from segtrain.data.loading import build_dataset, eval_loader
from segtrain.data.normalization import normalization
from segtrain.display import percent
from segtrain.engine.checkpoint import recorded_train_state
from segtrain.engine.distributed import DistContext, broadcast_object, init_distributed
from segtrain.engine.eval_tracking import EvalRecorder, EvalScores, Evaluation
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.lock import RunLock, refuse_used_eval_dir
from segtrain.engine.preemption import PreemptionHandler
from segtrain.engine.report import class_table, format_table, write_metrics
from segtrain.engine.restore import LoadedModel, load_for_inference
from segtrain.engine.resume import data_fingerprint, same_data
from segtrain.engine.runtime import resolve_amp
from segtrain.errors import Preempted
from segtrain.visualize import colorize, confusion_matrix_image, make_palette

log = logging.getLogger("segtrain.eval")

TRAINING_RECORD = "metrics.jsonl"  # written by every training run: marks a directory as one


def training_run_of(ckpt: Path) -> Path | None:
    """The training run directory a checkpoint belongs to (`<run>/checkpoints/<name>.pt`, or the run
    directory itself), or None for a checkpoint kept anywhere else."""
    run = ckpt if ckpt.is_dir() else ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    if run is None or not (run / "checkpoints").is_dir() or not (run / TRAINING_RECORD).is_file():
        return None
    return run


def _listed(pair: tuple[int, int] | None) -> list[int] | None:
    """A window as metrics.json has it (and segtrain.evaluate returns it): a list."""
    return None if pair is None else list(pair)


def _number(value: float) -> str:
    return f"{value:g}"


def protocol_name(cfg: DictConfig, settings: InferenceSettings) -> str:
    """What was evaluated, as a directory name: dataset, split and protocol (`shapes-val-whole`,
    `voc-val-whole-os8-ms0.5-1.75-flip`, `voc-val-slide473x473-flip`)."""
    parts = [str(cfg.dataset.name), str(cfg.eval.split)]
    window = f"{settings.crop_size[0]}x{settings.crop_size[1]}" if settings.crop_size else ""
    parts.append(f"slide{window}" if settings.mode == "slide" else str(settings.mode))
    if cfg.eval.output_stride:
        parts.append(f"os{cfg.eval.output_stride}")
    if settings.scales != (1.0,):
        scales = sorted(settings.scales)
        parts.append(f"ms{_number(scales[0])}-{_number(scales[-1])}" if len(scales) > 1 else f"s{_number(scales[0])}")
    if settings.flip:
        parts.append("flip")
    return "-".join(parts).replace("/", "_").replace(" ", "_")


def recorded_miou_note(state: dict, evaluated: dict) -> str:
    """The checkpoint's recorded val mIoU next to this evaluation's, only when it was measured on the
    same images (the same validation fingerprint: file names relative to the dataset root, sampled contents);
    else why not."""
    logged = recorded_train_state(state).get("best_miou")
    if not isinstance(logged, float) or logged < 0:
        return ""
    recorded = f"the checkpoint's recorded val mIoU {percent(logged)}%"
    saved = state.get("val_data_fingerprint")
    if isinstance(saved, dict) and same_data(saved, evaluated):
        return f" ({recorded}, on the same images)"
    if not isinstance(saved, dict):
        return (f" (not compared with {recorded}: the checkpoint does not record "
                "which images it was validated on)")
    return (f" (not compared with {recorded}: that was measured on other images, "
            f"{saved.get('count')} validation images with fingerprint {str(saved.get('sha256'))[:12]}, here "
            f"{evaluated['count']} with {evaluated['sha256'][:12]})")


def _join_processes(loaded, run_dir: Path) -> tuple[DistContext, Path]:
    """Under torchrun, this process's rank and device (the model moved there) and rank 0's run directory,
    where the predictions of every shard go; alone, rank 0 of one."""
    ctx = init_distributed(loaded.device.type)
    if ctx.enabled and ctx.device != loaded.device:
        loaded.model.to(ctx.device)
        loaded.device = ctx.device
    return ctx, Path(broadcast_object(str(run_dir), ctx))


def run_eval(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    """Score the checkpoint with the run directory's lock held (segtrain.engine.lock: no other command
    writes there meanwhile); write metrics.json, per_class_iou.csv, confusion_matrix.png, and record them to
    the `logger` trackers (segtrain.engine.eval_tracking; TensorBoard events by default); return what
    metrics.json holds."""
    refuse_used_eval_dir(run_dir)
    lock = RunLock(run_dir, "eval")
    lock.acquire()
    try:
        return _evaluate_into(composed, overrides, run_dir)
    finally:
        lock.release()


def _evaluate_into(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    loaded = load_for_inference(composed, overrides)
    ctx, run_dir = _join_processes(loaded, run_dir)
    cfg = loaded.cfg
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size, cfg.dataset.get("flip_pairs"))
    evaluation = Evaluation(run_dir, protocol_name(cfg, settings), int(recorded_train_state(loaded.state).get(
        "iteration") or 0), loaded.path, training_run_of(loaded.path))
    # The command line's trackers (never the checkpoint's config), started before the first image.
    with EvalRecorder.from_config(composed, cfg.logging.tensorboard, ctx) as recorder:
        recorder.start(evaluation, loaded.state)
        return _score(loaded, ctx, settings, evaluation, recorder)


def _score(loaded: LoadedModel, ctx: DistContext, settings: InferenceSettings, evaluation: Evaluation,
           recorder: EvalRecorder) -> dict:
    cfg, class_names, run_dir, ckpt = loaded.cfg, loaded.class_names, evaluation.run_dir, loaded.path
    recorded = recorded_train_state(loaded.state)
    amp = resolve_amp(cfg.trainer.amp, loaded.device)
    dataset = build_dataset(cfg.dataset, cfg.eval.split, train=False, normalize=normalization(cfg),
                            on_error=cfg.data.on_error, max_pixels=cfg.data.max_image_pixels)
    loader = eval_loader(dataset, cfg.eval.batch_size, cfg.eval.num_workers, loaded.device.type == "cuda")
    palette = make_palette(cfg.dataset.palette, len(class_names))
    save = None
    if cfg.eval.save_predictions:
        (run_dir / "predictions").mkdir(parents=True, exist_ok=True)

        def save(sample: dict, prediction: np.ndarray) -> None:
            stem = Path(dataset.samples[sample["index"]][0]).stem
            cv2.imwrite(str(run_dir / "predictions" / f"{stem}.png"),
                        cv2.cvtColor(colorize(prediction, palette), cv2.COLOR_RGB2BGR))

    log.info("evaluating %s (iteration %s) on %s/%s: %d images at full resolution, mode %s, scales %s, "
             "flip %s%s%s", ckpt, recorded.get("iteration"), cfg.dataset.name, cfg.eval.split, len(dataset),
             settings.mode, list(settings.scales), settings.flip,
             f", output stride {cfg.eval.output_stride}" if cfg.eval.output_stride else "",
             f", sharded over {ctx.world_size} processes" if ctx.enabled else "")
    with PreemptionHandler(what="evaluation") as signals:  # SIGTERM / Ctrl-C: stop at the next batch
        result = evaluate(loaded.model, loader, len(class_names), loaded.device, amp, cfg.dataset.ignore_index,
                          settings, progress=cfg.logging.progress, on_prediction=save,
                          stop_requested=lambda: signals.requested)
    if result.interrupted:
        raise Preempted(f"stopped by {signals.signal_name} during the evaluation of {len(dataset)} images; no "
                        "metrics were written: run the same command again", signals.signum)
    if not ctx.is_main:  # every process holds the summed matrix; rank 0 alone writes and reports
        return result.metrics
    metrics = result.metrics
    extra = {
        "checkpoint": str(ckpt),
        "iteration": recorded.get("iteration"),
        "dataset": cfg.dataset.name,
        "split": cfg.eval.split,
        "num_images": len(dataset),
        "protocol": {"mode": settings.mode, "crop_size": _listed(settings.crop_size),
                     "stride": _listed(settings.stride), "scales": list(settings.scales), "flip": settings.flip,
                     "output_stride": cfg.eval.output_stride},
        "seconds_per_image": result.seconds_per_image,
        "skipped_samples": result.skipped,
        "processes": ctx.world_size,
        # rows: labelled class, columns: predicted class (pixel counts), summed over every process's shard
        "confusion_matrix": result.matrix.tolist(),
    }
    written = write_metrics(run_dir, metrics, class_names, extra)
    matrix_image = confusion_matrix_image(result.matrix.numpy(), class_names)
    cv2.imwrite(str(run_dir / "confusion_matrix.png"), cv2.cvtColor(matrix_image, cv2.COLOR_RGB2BGR))
    table = format_table(metrics, class_names)  # TensorBoard's text tab holds the full table at any length
    recorder.record(evaluation, EvalScores(metrics, class_names, matrix_image, table, run_dir / "metrics.json"))
    print(class_table(metrics, class_names, csv_path=run_dir / "per_class_iou.csv"))
    note = recorded_miou_note(loaded.state, data_fingerprint(dataset.samples, cfg.dataset.root))
    for problem in result.skipped:
        log.warning("data.on_error=skip: left out of the metric: %s", problem)
    if result.skipped:
        note += f"; {len(result.skipped)} unusable images left out (data.on_error=skip, listed in metrics.json)"
    print(f"mIoU {percent(metrics['miou'])}% on {cfg.dataset.name}/{cfg.eval.split}{note}; "
          f"{result.seconds_per_image * 1000:.1f} ms per image")
    print(f"wrote {run_dir / 'metrics.json'}, per_class_iou.csv and confusion_matrix.png")
    return written
