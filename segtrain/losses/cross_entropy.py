"""Pixel-wise cross-entropy and its online-hard-example-mining variant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.errors import ConfigError
from segtrain.losses.base import SegmentationLoss


def _class_weights(class_weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    weights = [float(w) for w in class_weights]
    if len(weights) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(weights)} values for {num_classes} classes; give one "
                          "weight per class (dataset.class_names), or null")
    if any(w < 0 for w in weights) or not any(weights):
        raise ConfigError("loss.class_weights must be >= 0 and not all zero")
    return torch.tensor(weights, dtype=torch.float32)


class CrossEntropy(SegmentationLoss):
    """Pixel-wise cross-entropy, ignoring `ignore_index` (the dataset's), optionally class-weighted.

    With `class_weights` w it is PyTorch's weighted mean: sum_i w[y_i] * ce_i / sum_i w[y_i] over the
    labelled pixels i; the global batch is normalised by the sum of w[y_i] over all its labelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__(num_classes, ignore_index, aux_weight)
        weights = _class_weights(class_weights, num_classes)
        self.register_buffer("class_weights", weights, persistent=False)

    def pass_total(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
                               reduction="sum")

    def normalizer(self, target: torch.Tensor) -> torch.Tensor:
        labelled = target != self.ignore_index
        if self.class_weights is None:
            return labelled.sum().float()
        return (self.class_weights.to(target.device)[target.clamp(0, self.num_classes - 1)] * labelled).sum()


class OhemCrossEntropy(CrossEntropy):
    """Online hard example mining cross-entropy, as in the PSPNet/HRNet reference code.

    Within each forward pass, keep the labelled pixels whose predicted probability of the true class
    is below `threshold`; if fewer than `min_kept` are that hard, raise the threshold to the
    `min_kept`-th smallest probability. The pass's loss is the mean (class-weighted per pixel) over the
    kept pixels. The selection is per pass, as in the reference code (per GPU), so a global batch's
    loss is the mean of its passes' losses: `normalizer` counts passes, not pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4,
                 class_weights: Sequence[float] | None = None, threshold: float = 0.7,
                 min_kept: int = 100000) -> None:
        super().__init__(num_classes, ignore_index, aux_weight, class_weights)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"loss.threshold must be in (0, 1], got {threshold}")
        if not isinstance(min_kept, int) or isinstance(min_kept, bool) or min_kept < 1:
            raise ConfigError(f"loss.min_kept must be a whole number >= 1, got {min_kept!r}")
        self.threshold = float(threshold)
        self.min_kept = min_kept

    def hard_pixels(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the kept pixels, found on the device: no host read, no sort of every pixel.

        The reference sorts the labelled pixels' probabilities and takes the one at min(min_kept, labelled - 1).
        Only the min_kept + 1 smallest can be that one: `topk` selects them (a partial selection), and the
        position, a device number, picks one of them with `gather`.
        """
        labelled = target != self.ignore_index
        safe_target = torch.where(labelled, target, torch.zeros_like(target))
        prob = logits.detach().float().softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        # Unlabelled pixels rank last: probabilities are <= 1.
        ranked = torch.where(labelled, prob, torch.full_like(prob, 2.0)).flatten()
        smallest = ranked.topk(min(self.min_kept + 1, ranked.numel()), largest=False, sorted=True).values
        position = (labelled.sum() - 1).clamp(min=0, max=min(self.min_kept, smallest.numel() - 1))
        kth = smallest.gather(0, position.reshape(1)).squeeze(0)
        cutoff = torch.clamp(kth, min=self.threshold)
        return labelled & (prob < cutoff)

    def pass_total(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = self.hard_pixels(logits, target)
        losses = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
                                 reduction="none")
        return (losses * keep).sum() / keep.sum().clamp(min=1)

    def normalizer(self, target: torch.Tensor) -> torch.Tensor:
        return torch.ones((), device=target.device)
