"""`segtrain bench`: training and inference throughput, peak memory, data-pipeline rate, FLOP use.

Measured after warm-up on the chosen device (`trainer.device`) with the trainer's speed options
(`trainer.amp`, `trainer.channels_last`, `trainer.compile`). On CUDA the achieved TFLOP/s is
compared with a large matrix product timed in the same run (the device's practical peak).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from segtrain.commands.info import model_complexity
from segtrain.config import AugmentConfig, check_options
from segtrain.data.dataset import SegmentationDataset
from segtrain.data.loading import train_loader
from segtrain.data.transforms import train_transform
from segtrain.engine.distributed import DistContext
from segtrain.engine.evaluate import autocast
from segtrain.engine.runtime import resolve_amp, resolve_channels_last, resolve_device
from segtrain.engine.step import TrainStep, build_train_step
from segtrain.errors import ConfigError
from segtrain.models import build_model


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


def bench_train_step(cfg: DictConfig, device: torch.device) -> BenchSetup:
    """The trainer's own step (segtrain.engine.step) for cfg's model on random images of bench.crop_size."""
    b = cfg.bench
    crop = [int(v) for v in b.crop_size]
    num_classes = len(cfg.dataset.class_names)
    backbone_cfg = OmegaConf.merge(cfg.backbone, {"pretrained": False, "weights": None})
    model = build_model(cfg.model, backbone_cfg, num_classes).to(device)
    if resolve_channels_last(cfg.trainer.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    step = build_train_step(cfg, model, DistContext(0, 1, 0, device), num_classes)
    images = torch.randn(b.batch_size, 3, *crop, device=device).contiguous(memory_format=step.memory_format)
    masks = torch.randint(0, num_classes, (b.batch_size, *crop), device=device)
    return BenchSetup(model, step, images, masks)


def _timed(step: Callable[[int], object], warmup: int, count: int, batch_size: int, device: torch.device) -> float:
    for n in range(warmup):
        step(n + 1)
    _sync(device)
    start = time.perf_counter()
    for n in range(count):
        step(warmup + n + 1)
    _sync(device)
    return batch_size * count / (time.perf_counter() - start)


def run_bench(cfg: DictConfig, run_dir: Path) -> dict:
    b, t = cfg.bench, cfg.trainer
    if b.batch_size < 2 or b.steps < 1 or b.warmup < 0:
        raise ConfigError("bench.batch_size must be >= 2 (BatchNorm), bench.steps >= 1, bench.warmup >= 0")
    check_options(cfg)
    crop = [int(v) for v in b.crop_size]
    device = resolve_device(t.device)
    amp = resolve_amp(t.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    setup = bench_train_step(cfg, device)
    batches = [(setup.images, setup.masks)]
    setup.model.train()
    train_rate = _timed(lambda it: setup.step(it, batches), b.warmup, b.steps, b.batch_size, device)

    def infer_step(_: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            setup.step.forward(setup.images)

    setup.model.eval()
    infer_rate = _timed(infer_step, b.warmup, b.steps, b.batch_size, device)
    num_classes = len(cfg.dataset.class_names)
    memory, memory_kind = peak_memory_mb(device)
    complexity = model_complexity(cfg.model, cfg.backbone, num_classes, tuple(crop))
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
        "compile": bool(t.compile),
        "train_images_per_s": train_rate,
        "inference_images_per_s": infer_rate,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
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
        ("peak memory", f"{memory:.0f} MB ({memory_kind})"),
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
