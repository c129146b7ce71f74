"""Writing evaluation results: metrics.json, per_class_iou.csv and a console table.

With many classes (ADE20K's 150) a row per class buries the result, so the console gets a summary
(`class_table`) and the full table goes to a CSV file (`write_class_csv`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from segtrain.display import percent

SUMMARY_CLASSES = 5  # worst and best classes named in the summary of a long table


def format_table(metrics: dict, class_names: list[str]) -> str:
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}"]
    for name, iou, acc in zip(class_names, metrics["iou"], metrics["acc"]):
        lines.append(f"{name:<{width}}  {percent(iou):>7}  {percent(acc):>7}")
    lines.extend(_totals(metrics, width))
    return "\n".join(lines)


def _totals(metrics: dict, width: int) -> list[str]:
    return ["-" * (width + 18),
            f"{'mIoU':<{width}}  {percent(metrics['miou']):>7}",
            f"{'pixel acc':<{width}}  {percent(metrics['pixel_acc']):>7}",
            f"{'mean acc':<{width}}  {percent(metrics['mean_acc']):>7}"]


def class_table(metrics: dict, class_names: list[str], max_rows: int = 30, *, csv_path: Path | None = None) -> str:
    """The per-class table for up to `max_rows` classes; above that a summary: the 5 worst and the
    5 best classes by IoU, mIoU, pixel and mean accuracy, and how many classes have no IoU (no pixel
    labelled or predicted: n/a, left out of the mean). `csv_path` names the file with the full table."""
    if len(class_names) <= max_rows:
        return format_table(metrics, class_names)
    width = max(12, *(len(n) for n in class_names))
    scored = sorted((iou, index) for index, iou in enumerate(metrics["iou"]) if not math.isnan(iou))
    worst = scored[:SUMMARY_CLASSES]
    best = scored[len(worst):][-SUMMARY_CLASSES:][::-1]
    where = f": full table in {csv_path}" if csv_path is not None else ""
    lines = [f"{len(class_names)} classes, {len(worst)} worst and {len(best)} best by IoU{where}",
             f"{'class':<{width}}  {'IoU %':>7}  {'Acc %':>7}"]
    for label, rows in (("worst", worst), ("best", best)):
        lines.append(f"{label}:")
        lines.extend(f"{class_names[i]:<{width}}  {percent(iou):>7}  {percent(metrics['acc'][i]):>7}"
                     for iou, i in rows)
    lines.extend(_totals(metrics, width))
    missing = [name for name, iou in zip(class_names, metrics["iou"]) if math.isnan(iou)]
    if missing:
        named = ", ".join(missing[:SUMMARY_CLASSES]) + (", ..." if len(missing) > SUMMARY_CLASSES else "")
        lines.append(f"{'IoU n/a':<{width}}  {len(missing):>7}  classes with no pixel labelled or predicted: {named}")
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    """A killed process leaves the previous file or none, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_class_csv(path: Path, metrics: dict, class_names: list[str]) -> Path:
    """One row per class: `class` and every per-class metric of `metrics` (the lists with one value
    per class: iou, acc), six decimals, an empty cell for n/a. Written atomically; returns `path`."""
    path = Path(path)
    columns = [key for key, values in metrics.items()
               if isinstance(values, (list, tuple)) and len(values) == len(class_names)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", *columns])
    for index, name in enumerate(class_names):
        values = [float(metrics[key][index]) for key in columns]
        writer.writerow([name, *("" if math.isnan(v) else f"{v:.6f}" for v in values)])
    _write_atomically(path, buffer.getvalue())
    return path


def write_metrics(run_dir: Path, metrics: dict, class_names: list[str], extra: dict | None = None) -> dict:
    """metrics.json (NaN written as null) and per_class_iou.csv in `run_dir`; returns what metrics.json holds."""
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
    _write_atomically(run_dir / "metrics.json", json.dumps(payload, indent=2) + "\n")
    write_class_csv(run_dir / "per_class_iou.csv", metrics, class_names)
    return payload
