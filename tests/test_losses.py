import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from segtrain.engine.step import build_loss
from segtrain.errors import ConfigError
from segtrain.losses import CrossEntropy, OhemCrossEntropy


def _two_class_logits(true_class_probs: list[float], target: list[int]) -> torch.Tensor:
    """(1, 2, 1, N) logits whose softmax gives each pixel's true class the given probability."""
    logits = torch.zeros(1, 2, 1, len(target))
    for i, (p, t) in enumerate(zip(true_class_probs, target)):
        logits[0, t if t in (0, 1) else 0, 0, i] = math.log(p / (1 - p))
    return logits


def test_ohem_keeps_the_hardest_pixels():
    target = torch.tensor([[[0, 0, 1, 255]]])
    logits = _two_class_logits([0.9, 0.6, 0.3, 0.5], [0, 0, 1, 255])
    # Below the threshold 0.5 only the pixel at p=0.3 is hard, and min_kept=1 asks for no more (the
    # cutoff is max(0.5, second-smallest probability 0.6) and the comparison strict, as in the reference).
    alone = OhemCrossEntropy(2, threshold=0.5, min_kept=1)
    assert alone.hard_pixels(logits, target).tolist() == [[[False, False, True, False]]]
    assert alone({"out": logits}, target).item() == pytest.approx(-math.log(0.3), rel=1e-5)
    # min_kept=2 raises the cutoff to the third-smallest probability (0.9): the two hardest are kept.
    two = OhemCrossEntropy(2, threshold=0.5, min_kept=2)
    assert two.hard_pixels(logits, target).tolist() == [[[False, True, True, False]]]
    assert two({"out": logits}, target).item() == pytest.approx((-math.log(0.6) - math.log(0.3)) / 2, rel=1e-5)
    # The ignored pixel never counts, whatever min_kept asks for.
    assert not OhemCrossEntropy(2, threshold=1.0, min_kept=10).hard_pixels(logits, target)[0, 0, 3]


def test_class_weights_change_the_loss_as_defined():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    target[0, 0, :3] = 255
    weights = [1.0, 3.0, 0.5]
    weighted = CrossEntropy(3, class_weights=weights)({"out": logits}, target)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    # by hand: sum_i w[y_i] ce_i / sum_i w[y_i] over the labelled pixels
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    w = torch.tensor(weights)[target.clamp(max=2)] * (target != 255)
    assert weighted.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-6)
    assert weighted.item() != pytest.approx(CrossEntropy(3)({"out": logits}, target).item(), rel=1e-3)


def test_split_batches_with_the_global_normalizer_give_the_whole_batch_loss():
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    target[1, :4] = 255
    for loss in (CrossEntropy(3), CrossEntropy(3, class_weights=[0.2, 1.0, 2.0])):
        whole = loss({"out": logits}, target)
        normalizer = loss.normalizer(target[:2]) + loss.normalizer(target[2:])
        parts = loss({"out": logits[:2]}, target[:2], normalizer) + loss({"out": logits[2:]}, target[2:], normalizer)
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_auxiliary_outputs_are_weighted_by_aux_weight():
    torch.manual_seed(2)
    out, aux, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    main = F.cross_entropy(out, target).item()
    assert CrossEntropy(3, aux_weight=0.4)({"out": out, "aux": aux}, target).item() == pytest.approx(
        main + 0.4 * F.cross_entropy(aux, target).item(), rel=1e-6)
    assert CrossEntropy(3, aux_weight=0.0)({"out": out, "aux": aux}, target).item() == pytest.approx(main, rel=1e-6)


def test_loss_group_builds_from_config_and_names_bad_keys():
    cfg = compose_config("train", ["loss=ohem", "loss.min_kept=5", "dataset.ignore_index=254"])
    loss = build_loss(cfg, 6, cfg.dataset.ignore_index)
    assert isinstance(loss, OhemCrossEntropy) and loss.min_kept == 5 and loss.ignore_index == 254
    with pytest.raises(ConfigError, match="loss.class_weights has 2 values for 6 classes"):
        build_loss(compose_config("train", ["loss.class_weights=[1,2]"]), 6, 255)
    with pytest.raises(ConfigError, match="unknown key loss.treshold"):
        build_loss(compose_config("train", ["loss=ohem", "+loss.treshold=0.5"]), 6, 255)


# HRNet/HRNet-Semantic-Segmentation lib/datasets/cityscapes.py, classes in trainId order (road ... bicycle).
HRNET_CITYSCAPES_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


def test_hrnet_cityscapes_experiment_trains_with_the_official_class_weights():
    cfg = compose_config("train", ["experiment=hrnetv2_w48_cityscapes"])
    assert cfg.loss._target_ == "segtrain.losses.CrossEntropy"  # the recipe has USE_OHEM false
    assert list(cfg.loss.class_weights) == HRNET_CITYSCAPES_WEIGHTS
    loss = build_loss(cfg, len(cfg.dataset.class_names), cfg.dataset.ignore_index)
    assert cfg.dataset.class_names[0] == "road" and cfg.dataset.class_names[-1] == "bicycle"
    assert torch.allclose(loss.class_weights, torch.tensor(HRNET_CITYSCAPES_WEIGHTS))
