"""`segtrain bench`: training and inference throughput, peak memory, data-pipeline rate, FLOP use.

Measured after warm-up on the chosen device (`trainer.device`) with the trainer's speed options
(`trainer.amp`, `trainer.channels_last`, `trainer.compile`). On CUDA the achieved TFLOP/s is
compared with a large matrix product timed in the same run (the device's practical peak).

Start-up and compile time. Every warm-up step is timed on its own (synchronised); the first step is
always a warm-up step, so `bench.warmup=0` runs one untimed step too. "Start-up" is the warm-up's wall
time minus as many steady-state steps: what the first calls cost beyond a normal step. torch.compile
compiles lazily at the first call, and again at each recompilation, so with `trainer.compile=model` or
`=regions` this difference holds the compile time, recompilations during the warm-up included. With
`model` the training network is one graph; with `regions` (segtrain.engine.compile) `compiled_regions`
modules are each compiled at their first call. The inference pass (eval mode, no autograd) runs the
training step's compiled forward, which compiles once more for eval mode, measured the same way, and
`compiled_graphs` counts the graphs dynamo compiled over both passes. `compile_seconds` is the sum of
both start-ups with a compile mode (null with `trainer.compile=off`): an upper bound, since it also holds
the first-call costs an eager run has (cuDNN autotuning, allocator growth, lazy CUDA set-up); those are
the start-up figures of the same bench with `trainer.compile=off`. The wall time of the first
training step is reported too (`first_step_seconds`). To choose a mode, run the bench once per mode
(or `benchmarks/compile_modes.py`, which alternates the three in one process).

Memory: on CUDA the peak of allocated tensors (torch.cuda.max_memory_allocated) and of what the
caching allocator reserved from the driver (max_memory_reserved, what the GPU must hold: it also counts
fragmentation and freed blocks kept for reuse); on CPU the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch._dynamo.utils import counters
from tqdm import tqdm

from segtrain.commands.info import model_complexity
from segtrain.config import AugmentConfig
from segtrain.data.dataset import SegmentationDataset
from segtrain.data.loading import train_loader
from segtrain.data.transforms import mask_dtype, train_transform
from segtrain.engine.distributed import DistContext
from segtrain.engine.runtime import autocast, resolve_runtime
from segtrain.engine.step import TrainStep, build_train_step
from segtrain.errors import ConfigError
from segtrain.keys import given_keys
from segtrain.models import build_model
from segtrain.progress import progress_enabled


def synthetic_voc_images(folder: Path, count: int, size: tuple[int, int] = (375, 500)) -> list[tuple[Path, Path]]:
    """Textured JPEGs (decoding costs what a photo costs) with palette masks, VOC-sized by default."""
    rng = np.random.default_rng(0)
    samples = []
    for n in range(count):
        coarse = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        mask = cv2.resize(rng.integers(0, 21, (6, 8), dtype=np.uint8), (size[1], size[0]),
                          interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"{n}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        Image.fromarray(mask, mode="P").save(folder / f"{n}.png")
        samples.append((folder / f"{n}.jpg", folder / f"{n}.png"))
    return samples


def data_pipeline_rate(samples: list, crop: list[int], workers: int, total: int, batch: int = 8) -> float:
    """Training samples/s of read -> random scale 0.5-2 -> pad -> crop -> flip -> normalise."""
    transform = train_transform(AugmentConfig(crop_size=list(crop), scale_range=[0.5, 2.0]),
                                [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    dataset = SegmentationDataset(samples, 21, transform)
    loader = iter(train_loader(dataset, batch, workers, seed=0, start_sample=0, pin_memory=False))
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(max(1, total // batch)):
        next(loader)
    return max(1, total // batch) * batch / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def cuda_memory_mb(device: torch.device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) MB since the last reset of the peak statistics; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


@dataclass
class BenchSetup:
    model: nn.Module
    step: TrainStep
    images: torch.Tensor
    masks: torch.Tensor


def bench_train_step(cfg: DictConfig, device: torch.device, given: Collection[str] = ()) -> BenchSetup:
    """The trainer's own step (segtrain.engine.step) for cfg's model on random images of bench.crop_size;
    `given`: the keys set on the command line."""
    b = cfg.bench
    crop = [int(v) for v in b.crop_size]
    num_classes = len(cfg.dataset.class_names)
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "weights": None})
    runtime = resolve_runtime(cfg.trainer, device)
    model = build_model(cfg.model, backbone_cfg, num_classes).to(device, memory_format=runtime.memory_format)
    step = build_train_step(cfg, model, DistContext(0, 1, 0, device), runtime, num_classes, given)
    # As the loader hands them over: uint8 images and masks, converted and normalised inside the step.
    images = torch.randint(0, 256, (b.batch_size, 3, *crop), dtype=torch.uint8, device=device)
    masks = torch.randint(0, num_classes, (b.batch_size, *crop), device=device).to(
        mask_dtype(num_classes, int(cfg.dataset.ignore_index)))
    return BenchSetup(model, step, images, masks)


@dataclass
class Timing:
    images_per_s: float
    first_step_s: float  # wall time of the first call (compilation, autotuning, allocations)
    startup_s: float  # warm-up wall time beyond as many steady-state steps


class BenchProgress:
    """What bench is doing while it runs (a first compiled step can take minutes): one line per phase
    on stderr, with a bar over the phase's steps on a terminal."""

    def __init__(self, phases: int) -> None:
        self.phases, self.done = phases, 0

    def phase(self, what: str, steps: int | None = None) -> tqdm:
        self.done += 1
        print(f"bench {self.done}/{self.phases}: {what}", file=sys.stderr, flush=True)
        return tqdm(total=steps, desc=f"bench {self.done}/{self.phases}", unit="step", leave=False,
                    disable=steps is None or not progress_enabled(True), dynamic_ncols=True)


def _timed(step: Callable[[int], object], warmup: int, count: int, batch_size: int, device: torch.device,
           bar: tqdm) -> Timing:
    warm_times = []
    with bar:
        for n in range(max(warmup, 1)):  # the first call is never steady state: always a warm-up step
            _sync(device)
            start = time.perf_counter()
            step(n + 1)
            _sync(device)
            warm_times.append(time.perf_counter() - start)
            bar.update(1)
        start = time.perf_counter()
        for n in range(count):
            step(len(warm_times) + n + 1)
            bar.update(1)
        _sync(device)
    steady = (time.perf_counter() - start) / count
    return Timing(batch_size / steady, warm_times[0], max(0.0, sum(warm_times) - len(warm_times) * steady))


def _compile_row(seconds: float | None, regions: int | None, graphs: int | None) -> str:
    if seconds is None:
        return "- (trainer.compile=off)"
    if graphs is None:
        return f"{seconds:.2f} s (torch.compile unavailable: eager)"
    return f"{seconds:.2f} s (train + inference start-up; " + (f"{regions} regions, " if regions is not None else
                                                                "whole model, ") + f"{graphs} graphs)"


def run_bench(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict:
    """Time training steps and data loading; `overrides`: the command line's (segtrain.config_checks has
    checked the values)."""
    b, t = cfg.bench, cfg.trainer
    for key in sorted({"trainer.batch_size", "trainer.grad_accum_steps"} & given_keys(overrides)):
        raise ConfigError(f"{key} has no effect on segtrain bench: it times one pass of bench.batch_size images")
    crop = [int(v) for v in b.crop_size]
    runtime = resolve_runtime(t)
    device, amp = runtime.device, runtime.amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    progress = BenchProgress(phases=4)
    progress.phase(f"building {cfg.model._target_.rsplit('.', 1)[-1]} on {device}")
    setup = bench_train_step(cfg, device, given_keys(overrides))
    frames_before = counters["frames"]["total"]
    batches = [(setup.images, setup.masks)]
    setup.model.train()
    warm = max(b.warmup, 1)
    compiling = t.compile != "off"
    compiled = " (the first compiles: minutes on a large model)" if compiling else ""
    bar = progress.phase(f"training steps: {warm} warm-up + {b.steps} timed{compiled}", warm + b.steps)
    train = _timed(lambda it: setup.step(it, batches), b.warmup, b.steps, b.batch_size, device, bar)
    train_rate = train.images_per_s

    # The model takes normalised float images (the step converts the loader's uint8 ones on the device).
    inputs = setup.step.to_device(batches)[0][0]

    def infer_step(_: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            setup.step.forward(inputs)

    setup.model.eval()
    bar = progress.phase(f"inference passes: {warm} warm-up + {b.steps} timed", warm + b.steps)
    inference = _timed(infer_step, b.warmup, b.steps, b.batch_size, device, bar)
    infer_rate = inference.images_per_s
    compile_seconds = train.startup_s + inference.startup_s if compiling else None
    regions = setup.step.regions
    compiled_regions = len(regions.regions) if regions is not None else None
    # None where nothing was compiled: compile off, or torch.compile unavailable (the step fell back to eager).
    compiled_graphs = counters["frames"]["total"] - frames_before if setup.step.compiled else None
    num_classes = len(cfg.dataset.class_names)
    memory, memory_kind = peak_memory_mb(device)
    allocated, reserved = cuda_memory_mb(device)
    complexity = model_complexity(cfg.model, cfg.backbone, num_classes, tuple(crop))
    progress.phase(f"data pipeline: {b.data_samples} samples in one process")
    with tempfile.TemporaryDirectory() as tmp:
        samples = synthetic_voc_images(Path(tmp), 32)
        data_rate = data_pipeline_rate(samples, crop, 0, b.data_samples)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "backbone": cfg.backbone.get("name", cfg.backbone._target_),
        "batch_size": b.batch_size,
        "crop_size": crop,
        "amp": amp,
        "channels_last": setup.step.memory_format == torch.channels_last,
        "compile": str(t.compile),
        "train_images_per_s": train_rate,
        "inference_images_per_s": infer_rate,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
        "max_memory_allocated_mb": allocated,
        "max_memory_reserved_mb": reserved,
        "first_step_seconds": train.first_step_s,
        "train_startup_seconds": train.startup_s,
        "inference_startup_seconds": inference.startup_s,
        "compile_seconds": compile_seconds,
        "compiled_regions": compiled_regions,
        "compiled_graphs": compiled_graphs,
        "data_samples_per_s_per_worker": data_rate,
        "gflops_per_image": complexity["gflops"],
        "params_m": complexity["params"] / 1e6,
    }
    # Training costs about three forward passes (forward, and backward through inputs and weights).
    achieved = 3 * complexity["gflops"] * train_rate / 1000
    result["train_tflops"] = achieved
    if device.type == "cuda":
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16 if amp == "fp16" else torch.float32
        peak = matmul_peak_tflops(device, dtype)
        result.update({"matmul_peak_tflops": peak, "matmul_dtype": str(dtype).split(".")[-1],
                       "fraction_of_peak": achieved / peak})
    rows = [
        ("device", f"{result['device']} ({result['threads']} threads)" if device.type == "cpu" else result["device"]),
        ("model", f"{result['model']} + {result['backbone']}, batch {b.batch_size} x 3 x {crop[0]} x {crop[1]}"),
        ("amp / channels_last / compile", f"{amp} / {result['channels_last']} / {t.compile}"),
        ("train images/s", f"{train_rate:.2f}"),
        ("inference images/s", f"{infer_rate:.2f}"),
        ("peak memory", f"{memory:.0f} MB ({memory_kind})" if reserved is None else
         f"{allocated:.0f} MB allocated, {reserved:.0f} MB reserved (CUDA max)"),
        ("first training step", f"{train.first_step_s:.2f} s"),
        ("start-up (warm-up - steady)", f"train {train.startup_s:.2f} s, inference {inference.startup_s:.2f} s"),
        ("compile time", _compile_row(compile_seconds, compiled_regions, compiled_graphs)),
        ("data pipeline", f"{data_rate:.1f} samples/s per worker (500x375 JPEG -> {crop[0]}x{crop[1]} crop)"),
        ("GFLOPs per image", f"{complexity['gflops']:.2f} (forward; 1 multiply-add = 2 FLOPs)"),
        ("achieved", f"{achieved:.3f} TFLOP/s in training"
         + (f" = {100 * result['fraction_of_peak']:.1f}% of {result['matmul_peak_tflops']:.1f} TFLOP/s "
            f"({result['matmul_dtype']} matmul peak)" if "fraction_of_peak" in result else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {run_dir / 'bench.json'}")
    return result
