"""Device choice, seeding and determinism: the process-level settings of a run."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from segtrain.config import amp_mode, channels_last_mode
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


def resolve_amp(requested: object, device: torch.device) -> str:
    """trainer.amp for `device`: auto is bf16 on CUDA devices that support it (Ampere and newer), fp16
    with a GradScaler on older CUDA devices, and off on CPU; an explicit value is taken as given."""
    amp = amp_mode(requested)
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_channels_last(requested: object, device: torch.device) -> bool:
    """trainer.channels_last for `device`: auto is on for CUDA (tensor cores want NHWC), off on CPU."""
    mode = channels_last_mode(requested)
    return device.type == "cuda" if mode == "auto" else mode == "true"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for a resolved trainer.amp (off, bf16, fp16) on `device`."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning pays off only for fixed shapes (training crops); for images of varying size
    (validation, eval, predict) every new size would be tuned again. Restored on exit."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


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


def stop_worker_processes() -> None:
    """Kill this process's child processes (data-loader workers) on the way out of a command.

    Loader workers ignore SIGTERM and SIGINT so that a preempted run can finish its step and write a
    checkpoint; Python's exit terminates daemonic children with SIGTERM and then joins them, which
    would wait forever. Every exit path of a command (success, error, NaN stop, preemption,
    KeyboardInterrupt) ends here, so the process exits within seconds.
    """
    import multiprocessing
    import signal
    import threading

    children = multiprocessing.active_children()
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        # PyTorch's SIGCHLD handler reports a killed worker as an error; these deaths are ours.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in multiprocessing.active_children():
        child.join(timeout=5)
