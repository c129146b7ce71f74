"""Device choice, seeding and determinism: the process-level settings of a run."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from segtrain.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={requested} but no CUDA GPU is visible to PyTorch; "
                "use trainer.device=cpu or trainer.device=auto"
            )
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {requested!r}")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on an interactive terminal; logs and CI get plain log lines."""
    return bool(requested) and sys.stderr.isatty()
