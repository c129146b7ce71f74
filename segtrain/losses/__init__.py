"""Segmentation losses: the `loss` config group (conf/loss/), one class per loss.

A loss sees the model's outputs (`{"out": ..., plus the auxiliary outputs the model declares in
training}`) and the target, and returns a scalar. The main output counts fully, every auxiliary
output with `aux_weight` (PSPNet's FCN head on layer3: 0.4 in the paper).

Global-batch normalisation: a loss is `total(pass) / normalizer`, where `total` is what one forward
pass contributes and `normalizer(target)` is computable from the target alone, before the forward
pass. The training step sums `normalizer` over every pass of the global batch (accumulation steps
and processes) and divides each pass's total by that sum, so any split of the batch gives the loss,
and the gradient, of one big batch. Called without a normalizer, a loss is the plain mean over its
own input.
"""

from segtrain.losses.base import SegmentationLoss
from segtrain.losses.cross_entropy import CrossEntropy, OhemCrossEntropy

__all__ = ["CrossEntropy", "OhemCrossEntropy", "SegmentationLoss"]
