"""A run's `result.json`: how it ended, for the sweep summary (segtrain.sweep) and for scripts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """result.json: how the run ended (NaN written as null), for the sweep summary and for scripts."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    tmp = Path(run_dir) / f"{RESULT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    os.replace(tmp, Path(run_dir) / RESULT_FILE)
