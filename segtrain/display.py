"""How segtrain shows a score to a person: one format for every log line, table and summary."""

from __future__ import annotations

import math


def percent(value: float | None) -> str:
    """The one way segtrain shows an mIoU, IoU or accuracy to a person: percent with two decimals
    (`56.79`), `n/a` for none (a run's best before its first validation is -1). Files (metrics.json,
    metrics.jsonl, CSV, TensorBoard) keep fractions."""
    if value is None or not math.isfinite(value) or value < 0:
        return "n/a"
    return f"{100 * value:.2f}"

