"""Writing evaluation results: metrics.json, per_class_iou.csv and a console table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def format_table(metrics: dict, class_names: list[str]) -> str:
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}"]
    for name, iou, acc in zip(class_names, metrics["iou"], metrics["acc"]):
        lines.append(f"{name:<{width}}  {_pct(iou):>7}  {_pct(acc):>7}")
    lines.append("-" * (width + 18))
    lines.append(f"{'mIoU':<{width}}  {_pct(metrics['miou']):>7}")
    lines.append(f"{'pixel acc':<{width}}  {_pct(metrics['pixel_acc']):>7}")
    lines.append(f"{'mean acc':<{width}}  {_pct(metrics['mean_acc']):>7}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def write_metrics(run_dir: Path, metrics: dict, class_names: list[str], extra: dict | None = None) -> None:
    """metrics.json (NaN written as null) and per_class_iou.csv in `run_dir`."""
    def clean(v: float) -> float | None:
        return None if isinstance(v, float) and math.isnan(v) else v

    payload = {
        "miou": clean(metrics["miou"]),
        "pixel_acc": clean(metrics["pixel_acc"]),
        "mean_acc": clean(metrics["mean_acc"]),
        "per_class": {
            name: {"iou": clean(iou), "acc": clean(acc)}
            for name, iou, acc in zip(class_names, metrics["iou"], metrics["acc"])
        },
        **(extra or {}),
    }
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(run_dir / "per_class_iou.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "acc"])
        for name, iou, acc in zip(class_names, metrics["iou"], metrics["acc"]):
            writer.writerow([name, "" if math.isnan(iou) else f"{iou:.6f}", "" if math.isnan(acc) else f"{acc:.6f}"])
