"""Device choice, seeding and determinism: the process-level settings of a run."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from segtrain.config_checks import compile_mode
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
    return torch.device(requested)  # cpu: the value was checked by segtrain.config_checks


def resolve_amp(requested: str, device: torch.device) -> str:
    """trainer.amp (canonical: segtrain.config_checks) for `device`: auto is bf16 on CUDA devices that support
    it (Ampere and newer), fp16 with a GradScaler on older CUDA devices, and off on CPU; an explicit value
    is taken as given."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_channels_last(requested: str, device: torch.device) -> bool:
    """trainer.channels_last (canonical: segtrain.config_checks) for `device`: auto is on for CUDA (tensor
    cores want NHWC), off on CPU."""
    return device.type == "cuda" if requested == "auto" else requested == "true"


@dataclass(frozen=True)
class Runtime:
    """How this process runs the network, resolved once from `trainer.*` for its device: the engine
    receives it and never reads those keys again."""

    device: torch.device
    amp: str  # off | bf16 | fp16
    channels_last: bool
    compile: str = "off"  # off | model | regions (canonical: segtrain.config_checks)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_runtime(trainer: object, device: torch.device | None = None) -> Runtime:
    """`trainer` is the `trainer` config section; `device` the process's device when already chosen
    (under torchrun, the local rank's GPU), else `trainer.device` resolved here."""
    device = resolve_device(str(trainer.device)) if device is None else device  # type: ignore[attr-defined]
    return Runtime(device, resolve_amp(trainer.amp, device),  # type: ignore[attr-defined]
                   resolve_channels_last(trainer.channels_last, device),  # type: ignore[attr-defined]
                   compile_mode(getattr(trainer, "compile", "off")))


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
