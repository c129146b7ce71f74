"""`segtrain eval ckpt=PATH`: rebuild the model from the checkpoint's own config and score a split."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segtrain.config import CommonConfig
from segtrain.data.loading import build_dataset, eval_loader
from segtrain.engine.checkpoint import load_checkpoint
from segtrain.engine.evaluate import evaluate
from segtrain.engine.report import format_table, write_metrics
from segtrain.engine.runtime import check_amp, resolve_device
from segtrain.errors import ConfigError
from segtrain.models import build_model

log = logging.getLogger("segtrain.eval")

GROUPS = ("model", "backbone", "dataset", "optimizer", "schedule")


def apply_overrides(stored: DictConfig, composed: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply the command line's overrides (already validated and typed in `composed`) to `stored`.

    A group choice (`dataset=voc`) replaces the whole section; a key (`dataset.root=...`) replaces
    one value. Everything else stays as it was when the checkpoint was trained.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        override = parser.parse_override(text)
        key = override.key_or_group
        if key == "ckpt" or override.is_delete():
            continue
        if key == "experiment":
            raise ConfigError("experiment= cannot be changed at evaluation; override single keys instead")
        if key in GROUPS:
            stored[key] = composed[key]
        else:
            OmegaConf.update(stored, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return stored


def checkpoint_config(state: dict, composed: DictConfig, overrides: list[str]) -> DictConfig:
    stored = OmegaConf.create(state["config"])
    for key in ("resume", "ckpt"):
        stored.pop(key, None)
    stored = apply_overrides(stored, composed, overrides)
    try:
        return OmegaConf.merge(OmegaConf.structured(CommonConfig), stored)
    except Exception as exc:  # noqa: BLE001 - OmegaConf validation errors
        raise ConfigError(f"the config stored in the checkpoint does not validate: {exc}") from None


def run_eval(composed: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    if OmegaConf.is_missing(composed, "ckpt"):
        raise ConfigError("ckpt is required: segtrain eval ckpt=outputs/<run>/checkpoints/best.pt")
    ckpt = Path(composed.ckpt)
    state = load_checkpoint(ckpt)
    cfg = checkpoint_config(state, composed, overrides)
    class_names = list(cfg.dataset.class_names)
    saved_names = list(state.get("class_names", class_names))
    if saved_names != class_names:
        raise ConfigError(
            f"{ckpt} predicts {len(saved_names)} classes but dataset '{cfg.dataset.name}' has "
            f"{len(class_names)}; evaluate on the dataset the model was trained for"
        )
    device = resolve_device(cfg.trainer.device)
    amp = check_amp(cfg.trainer.amp)
    model = build_model(cfg.model, cfg.backbone, len(class_names))
    model.load_state_dict(state["model"])
    model.to(device)
    dataset = build_dataset(cfg.dataset, cfg.eval.split, train=False)
    loader = eval_loader(dataset, cfg.eval.batch_size, cfg.eval.num_workers, device.type == "cuda")
    log.info("evaluating %s (iteration %s) on %s/%s: %d images at full resolution", ckpt,
             state.get("iteration"), cfg.dataset.name, cfg.eval.split, len(dataset))
    result = evaluate(model, loader, len(class_names), device, amp, cfg.dataset.ignore_index,
                      progress=cfg.logging.progress)
    metrics = result.metrics
    extra = {
        "checkpoint": str(ckpt),
        "iteration": state.get("iteration"),
        "dataset": cfg.dataset.name,
        "split": cfg.eval.split,
        "num_images": len(dataset),
    }
    write_metrics(run_dir, metrics, class_names, extra)
    print(format_table(metrics, class_names))
    logged = state.get("best_miou")
    note = f" (the training run logged best mIoU {logged:.4f})" if isinstance(logged, float) and logged >= 0 else ""
    print(f"mIoU {metrics['miou']:.4f} on {cfg.dataset.name}/{cfg.eval.split}{note}")
    print(f"wrote {run_dir / 'metrics.json'} and {run_dir / 'per_class_iou.csv'}")
    return metrics
