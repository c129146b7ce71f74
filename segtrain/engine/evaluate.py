"""The evaluation loop: full-resolution inference (segtrain.engine.inference) and the confusion matrix."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.engine.inference import InferenceSettings, infer
from segtrain.engine.runtime import autocast, cudnn_autotuning
from segtrain.metrics import ConfusionMatrix
from segtrain.progress import progress_enabled

log = logging.getLogger("segtrain.eval")
ETA_LOG_SECONDS = 60.0  # without a progress bar (logs, batch jobs): a progress line with the ETA this often


def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


class EtaLog:
    """Where no progress bar is drawn (a log file, a batch job), a line every ETA_LOG_SECONDS with the
    images done, the rate and the time left: long multi-scale evaluations say when they will end."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or done == 0 or now - self.last < ETA_LOG_SECONDS:
            return
        self.last = now
        per_image = (now - self.start) / done
        left = int(per_image * (self.total - done))
        log.info("eval: %d/%d images, %.2f s per image, ETA %d:%02d:%02d", done, self.total, per_image,
                 left // 3600, left // 60 % 60, left % 60)


@dataclass
class EvalResult:
    metrics: dict
    matrix: torch.Tensor
    seconds_per_image: float
    # (normalised CHW image, mask HW, prediction HW) as numpy, for the first few images.
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    # data.on_error=skip: the problems of the samples left out of the metric (of every process).
    skipped: list[str] = field(default_factory=list)


def _batches_by_size(samples: list[dict]) -> list[list[dict]]:
    """Consecutive samples of equal size run together; images are never resized or cropped."""
    groups: list[list[dict]] = []
    for sample in samples:
        if groups and groups[-1][0]["image"].shape == sample["image"].shape:
            groups[-1].append(sample)
        else:
            groups.append([sample])
    return groups


def _gathered(items: list[str]) -> list[str]:
    """Every process's `items`, rank by rank (this process's alone without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    parts: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part or []]


@torch.no_grad()
@cudnn_autotuning(False)  # images keep their own sizes: autotuning would tune every new one (restored after)
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: str = "off",
    ignore_index: int = 255,
    settings: InferenceSettings = InferenceSettings(),
    num_examples: int = 0,
    progress: bool = False,
    on_prediction: Callable[[dict, np.ndarray], None] | None = None,
) -> EvalResult:
    """Score `loader` (a shard of it per process under torch.distributed; the matrix is summed)."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    examples = []
    images, start = 0, time.perf_counter()
    # This process's share (all of it without torch.distributed); rank 0 speaks for the others, whose
    # shards are as long within one image.
    total = len(loader.sampler)
    drawn = progress_enabled(progress) and _main_process()
    bar = tqdm(total=total, desc="eval", unit="img", disable=not drawn, leave=False)
    eta = EtaLog(total, progress and not drawn and _main_process())
    skipped: list[str] = []
    for batch in loader:
        skipped.extend(s["skipped"] for s in batch if s["image"] is None)
        bar.update(sum(s["image"] is None for s in batch))
        eta.update(images + len(skipped))
        for group in _batches_by_size([s for s in batch if s["image"] is not None]):
            inputs = torch.stack([s["image"] for s in group]).to(device, non_blocking=True)
            masks = torch.stack([s["mask"] for s in group]).to(device, non_blocking=True)
            with autocast(device, amp):
                scores = infer(model, inputs, settings)
            prediction = scores.argmax(1)
            matrix.update(prediction, masks)
            if on_prediction is not None or len(examples) < num_examples:
                predicted = prediction.cpu().numpy()
                for i, sample in enumerate(group):
                    if on_prediction is not None:
                        on_prediction(sample, predicted[i])
                    if len(examples) < num_examples:
                        examples.append((sample["image"].numpy(), sample["mask"].numpy(), predicted[i]))
            images += len(group)
            bar.update(len(group))
            eta.update(images + len(skipped))
    bar.close()
    matrix.all_reduce()
    skipped = _gathered(skipped)
    model.train(was_training)
    seconds = (time.perf_counter() - start) / max(images, 1)
    return EvalResult(matrix.compute(), matrix.matrix.cpu(), seconds, examples, skipped)
