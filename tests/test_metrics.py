import math

import pytest
import torch

from segtrain.metrics import ConfusionMatrix


def test_confusion_matrix_counts_and_ignores_255():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.matrix, expected)


def test_miou_against_hand_computation():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    m = cm.compute()
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 0 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert m["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 6)
    assert m["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_absent_class_is_left_out_of_the_mean_but_a_false_positive_class_counts():
    cm = ConfusionMatrix(4)
    # class 3 appears nowhere; class 2 is predicted once but never labelled (IoU 0, counted).
    cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 1]))
    m = cm.compute()
    assert math.isnan(m["iou"][3])
    assert m["iou"][:3] == pytest.approx([1.0, 0.5, 0.0])
    assert m["miou"] == pytest.approx(0.5)
    assert math.isnan(m["acc"][2]) and math.isnan(m["acc"][3])
    assert m["mean_acc"] == pytest.approx((1.0 + 0.5) / 2)


def test_all_ignored_gives_nan_scores_not_an_error():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(3, dtype=torch.long), torch.full((3,), 255))
    m = cm.compute()
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_acc"])


def test_accumulates_over_batches_in_int64():
    cm = ConfusionMatrix(2)
    for _ in range(3):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[3, 3], [0, 0]]
