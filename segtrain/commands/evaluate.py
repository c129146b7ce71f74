"""`segtrain eval ckpt=PATH`: rebuild the model from the checkpoint's own config and score a split."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from segtrain.config import CommonConfig
from segtrain.data.loading import build_dataset, eval_loader
from segtrain.data.normalization import normalization
from segtrain.engine.checkpoint import load_checkpoint, recorded_train_state
from segtrain.engine.ema import inference_weights
from segtrain.engine.evaluate import evaluate
from segtrain.engine.inference import InferenceSettings
from segtrain.engine.lock import refuse_used_eval_dir
from segtrain.engine.report import format_table, write_metrics
from segtrain.engine.resume import NOT_ARCHITECTURE, stored_config
from segtrain.engine.runtime import resolve_amp, resolve_device
from segtrain.errors import ConfigError, WeightsError
from segtrain.instantiate import check_stored_targets
from segtrain.keys import check_effective
from segtrain.models import backbone_for_inference, build_model
from segtrain.visualize import colorize, confusion_matrix_image, make_palette

log = logging.getLogger("segtrain.eval")

GROUPS = ("model", "backbone", "dataset", "loss", "optimizer", "schedule")
# The eval keys a protocol (conf/protocol/) sets: `protocol=NAME` replaces these in the checkpoint's config.
PROTOCOL_KEYS = ("mode", "crop_size", "stride", "scales", "flip", "output_stride")
# Keys of the command's own config, never taken from (or written into) the training config.
COMMAND_KEYS = ("ckpt", "input", "output", "format", "predict", "export", "resume", "init_from", "info")


def trained_network(stored: DictConfig) -> str:
    """`model DeepLabV3Plus + backbone resnet101`: what a stored config's network is, in words."""
    def name(node: object) -> str:
        if not isinstance(node, DictConfig):
            return "?"
        return str(node.get("name") or str(node.get("_target_", "?")).rsplit(".", 1)[-1])

    model = stored.get("model")
    model_name = str(model.get("_target_", "?")).rsplit(".", 1)[-1] if isinstance(model, DictConfig) else "?"
    return f"model {model_name} + backbone {name(stored.get('backbone'))}"


def _architecture(node: object) -> object:
    if not isinstance(node, DictConfig):
        return node
    plain = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in plain.items() if k not in NOT_ARCHITECTURE}


def refuse_network_change(stored: DictConfig, composed: DictConfig, group: str, choice: str, source: str) -> None:
    """The network is the checkpoint's: `model=`/`backbone=` may only name what it was trained with."""
    if _architecture(composed.get(group)) != _architecture(stored.get(group)):
        raise ConfigError(f"{group}={choice}: {source} was trained with {trained_network(stored)}; the network comes "
                          f"from the checkpoint, so drop {group}= (eval.output_stride=8 changes the output stride)")


def apply_overrides(stored: DictConfig, composed: DictConfig, overrides: list[str],
                    source: str = "the checkpoint") -> DictConfig:
    """Apply the command line's overrides (already validated and typed in `composed`) to `stored`.

    A group choice (`dataset=voc`) replaces the whole section; a key (`dataset.root=...`) replaces
    one value. Everything else stays as it was when the checkpoint was trained.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if key.split(".")[0] in (*COMMAND_KEYS, "hydra") or override.is_delete():
            continue
        if key == "experiment":
            raise ConfigError("experiment= cannot be changed at evaluation; override single keys instead")
        check_effective(key)
        if key == "protocol":  # its values are in composed.eval, with the eval.* keys of the command line on top
            for name in PROTOCOL_KEYS:
                OmegaConf.update(stored, f"eval.{name}", composed.eval[name], merge=False, force_add=True)
        elif key in ("model", "backbone"):
            refuse_network_change(stored, composed, key, text.split("=", 1)[1], source)
        elif key in GROUPS:
            stored[key] = composed[key]
        else:
            OmegaConf.update(stored, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return stored


def trusted_target_keys(overrides: list[str]) -> set[str]:
    """Keys the command line sets: a group choice (`dataset=folder`) replaces its whole section."""
    return {text.split("=", 1)[0].lstrip("+~") for text in overrides}


def checkpoint_config(state: dict, composed: DictConfig, overrides: list[str], source: str = "the checkpoint"
                      ) -> DictConfig:
    stored = stored_config(state, source)
    check_stored_targets(OmegaConf.to_container(stored, resolve=False), source, trusted_target_keys(overrides))
    # The training command's own top-level keys (resume, ...) are not part of what inference rebuilds.
    shared = {f.name for f in fields(CommonConfig)}
    for key in [k for k in stored.keys() if k not in shared]:
        stored.pop(key)
    stored = apply_overrides(stored, composed, overrides, source)
    try:
        return OmegaConf.merge(OmegaConf.structured(CommonConfig), stored)
    except Exception as exc:  # noqa: BLE001 - OmegaConf validation errors
        raise ConfigError(f"the config stored in the checkpoint does not validate: {exc}") from None


def checkpoint_view(composed: DictConfig, overrides: list[str]) -> DictConfig:
    """What eval, predict, export and info run with (`--cfg job`): the checkpoint's config with the
    command line applied, plus the command's own keys (ckpt, input, output, ...)."""
    ckpt = Path(composed.ckpt)
    merged = checkpoint_config(load_checkpoint(ckpt), composed, overrides, str(ckpt))
    view = OmegaConf.to_container(merged, resolve=False)
    own = OmegaConf.to_container(composed, resolve=False)
    view.update({key: own[key] for key in COMMAND_KEYS if key in own})
    return OmegaConf.create(view)


@dataclass
class LoadedModel:
    cfg: DictConfig
    model: nn.Module
    state: dict
    device: torch.device
    class_names: list[str]


def load_for_inference(composed: DictConfig, overrides: list[str]) -> LoadedModel:
    """Checkpoint -> (config with the command line applied, model in eval mode on its device).

    `eval.output_stride` rebuilds a dilatable backbone at that stride before loading the weights
    (dilation changes no weight shape), e.g. a model trained at 16 evaluated at 8; the ASPP rates follow.
    """
    if OmegaConf.is_missing(composed, "ckpt"):
        raise ConfigError("ckpt is required: ckpt=outputs/<run>/checkpoints/best.pt")
    ckpt = Path(composed.ckpt)
    state = load_checkpoint(ckpt)
    cfg = checkpoint_config(state, composed, overrides, str(ckpt))
    class_names = list(cfg.dataset.class_names)
    saved_names = list(state.get("class_names", class_names))
    if saved_names != class_names:
        raise ConfigError(
            f"{ckpt} predicts {len(saved_names)} classes but dataset '{cfg.dataset.name}' has "
            f"{len(class_names)}; use the dataset the model was trained for"
        )
    backbone_cfg = backbone_for_inference(cfg.backbone, cfg.eval.output_stride)
    device = resolve_device(cfg.trainer.device)
    model = build_model(cfg.model, backbone_cfg, len(class_names))
    try:
        model.load_state_dict(inference_weights(state, str(ckpt)))
    except RuntimeError as exc:  # e.g. a model.* override that changes a layer's shape
        changed = sorted(k for k in trusted_target_keys(overrides) if k.split(".")[0] in ("model", "backbone"))
        built = f" built with {', '.join(changed)}" if changed else ""
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise WeightsError(f"the weights in {ckpt} do not fit the network{built} (trained: {trained_network(cfg)}): "
                           f"{detail[min(1, len(detail) - 1)]}") from None
    model.to(device).eval()
    return LoadedModel(cfg, model, state, device, class_names)


def run_eval(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    refuse_used_eval_dir(run_dir)
    loaded = load_for_inference(composed, overrides)
    cfg, class_names = loaded.cfg, loaded.class_names
    recorded = recorded_train_state(loaded.state)
    ckpt = Path(composed.ckpt)
    amp = resolve_amp(cfg.trainer.amp, loaded.device)
    settings = InferenceSettings.from_config(cfg.eval, cfg.dataset.augment.crop_size)
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
             "flip %s%s", ckpt, recorded.get("iteration"), cfg.dataset.name, cfg.eval.split, len(dataset),
             settings.mode, list(settings.scales), settings.flip,
             f", output stride {cfg.eval.output_stride}" if cfg.eval.output_stride else "")
    result = evaluate(loaded.model, loader, len(class_names), loaded.device, amp, cfg.dataset.ignore_index,
                      settings, progress=cfg.logging.progress, on_prediction=save)
    metrics = result.metrics
    extra = {
        "checkpoint": str(ckpt),
        "iteration": recorded.get("iteration"),
        "dataset": cfg.dataset.name,
        "split": cfg.eval.split,
        "num_images": len(dataset),
        "protocol": {"mode": settings.mode, "crop_size": settings.crop_size, "stride": settings.stride,
                     "scales": list(settings.scales), "flip": settings.flip,
                     "output_stride": cfg.eval.output_stride},
        "seconds_per_image": result.seconds_per_image,
        "skipped_samples": result.skipped,
    }
    write_metrics(run_dir, metrics, class_names, extra)
    matrix_image = confusion_matrix_image(result.matrix.numpy(), class_names)
    cv2.imwrite(str(run_dir / "confusion_matrix.png"), cv2.cvtColor(matrix_image, cv2.COLOR_RGB2BGR))
    table = format_table(metrics, class_names)
    if cfg.logging.tensorboard:
        with SummaryWriter(str(run_dir)) as writer:
            step = int(recorded.get("iteration") or 0)
            # The tags of training's validation (val/mIoU, val_iou/<class>) with eval/ in place of val/.
            for key, tag in (("miou", "eval/mIoU"), ("pixel_acc", "eval/pixel_acc"), ("mean_acc", "eval/mean_acc")):
                writer.add_scalar(tag, metrics[key], step)
            for name, iou in zip(class_names, metrics["iou"]):
                if not math.isnan(iou):
                    writer.add_scalar(f"eval_iou/{name}", iou, step)
            writer.add_text("eval/per_class_iou", "    " + table.replace("\n", "\n    "), step)
            writer.add_image("eval/confusion_matrix", matrix_image, step, dataformats="HWC")
    print(table)
    logged = recorded.get("best_miou")
    note = f" (checkpoint's recorded val mIoU {logged:.4f})" if isinstance(logged, float) and logged >= 0 else ""
    for problem in result.skipped:
        log.warning("data.on_error=skip: left out of the metric: %s", problem)
    if result.skipped:
        note += f"; {len(result.skipped)} unusable images left out (data.on_error=skip, listed in metrics.json)"
    print(f"mIoU {metrics['miou']:.4f} on {cfg.dataset.name}/{cfg.eval.split}{note}; "
          f"{result.seconds_per_image * 1000:.1f} ms per image")
    print(f"wrote {run_dir / 'metrics.json'}, per_class_iou.csv and confusion_matrix.png")
    return metrics
