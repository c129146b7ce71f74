"""The evaluation loop: full-resolution inference and the confusion matrix."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.engine.runtime import progress_enabled
from segtrain.metrics import ConfusionMatrix


@dataclass
class EvalResult:
    metrics: dict
    # (normalised CHW image, mask HW, prediction HW) as numpy, for the first few images.
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches_by_size(samples: list[dict]) -> list[list[dict]]:
    """Consecutive samples of equal size run together; images are never resized or cropped."""
    groups: list[list[dict]] = []
    for sample in samples:
        if groups and groups[-1][0]["image"].shape == sample["image"].shape:
            groups[-1].append(sample)
        else:
            groups.append([sample])
    return groups


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: str = "off",
    ignore_index: int = 255,
    num_examples: int = 0,
    progress: bool = False,
) -> EvalResult:
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    examples = []
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress_enabled(progress), leave=False):
        for group in _batches_by_size(batch):
            images = torch.stack([s["image"] for s in group]).to(device, non_blocking=True)
            masks = torch.stack([s["mask"] for s in group]).to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(images)["out"]
            prediction = logits.argmax(1)
            matrix.update(prediction, masks)
            for i in range(len(group)):
                if len(examples) < num_examples:
                    examples.append((group[i]["image"].numpy(), group[i]["mask"].numpy(),
                                     prediction[i].cpu().numpy()))
    matrix.all_reduce()
    model.train(was_training)
    return EvalResult(matrix.compute(), examples)
