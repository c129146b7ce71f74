"""Confusion matrix on the device and the scores derived from it.

Convention: IoU of class c = TP / (TP + FP + FN). A class absent from both the labels and the
predictions (TP + FP + FN = 0) has an undefined IoU (NaN) and is left out of the mean; a class that
is predicted but never labelled has IoU 0 and counts. Mean class accuracy averages TP / labelled
pixels over the classes that have labelled pixels. Pixels labelled `ignore_index` are not counted.
"""

from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """rows = ground truth, columns = prediction; int64 counts accumulated where the data lives."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true class indices (same shape); ignore pixels are skipped."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        target = target.to(self.matrix.device).long()
        n = self.num_classes
        # Ignored pixels count into one extra cell past the matrix instead of being masked out: boolean
        # indexing and CUDA's bincount read sizes back to the host; a scatter-add of ones reads nothing.
        cell = torch.where(target != self.ignore_index, target * n + prediction.to(self.matrix.device).long(), n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=self.matrix.device)
        ones = torch.ones((), dtype=torch.int64, device=self.matrix.device).expand(cell.numel())
        counts.index_add_(0, cell.flatten(), ones)
        self.matrix += counts[: n * n].view(n, n)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> dict:
        m = self.matrix.double().cpu()
        tp = m.diag()
        labelled, predicted = m.sum(1), m.sum(0)
        union = labelled + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, math.nan))
        total = m.sum()
        return {
            "miou": _nanmean(iou),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": _nanmean(acc),
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
        }


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else math.nan
