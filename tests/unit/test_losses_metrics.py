"""Losses, the coarse-weight schedule and the metrics."""

import math

import numpy as np
import pytest
import torch

from imedsam.losses import CoarseFineLoss, DiceBCELoss, coarse_weight_at
from imedsam.metrics import binary_metrics, boundary_iou, dice


def test_coarse_weight_schedule_follows_the_official_one_by_default():
    assert [coarse_weight_at(e) for e in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert coarse_weight_at(5, start=1.0, end=0.5, decay_epochs=10) == pytest.approx(0.75)
    assert coarse_weight_at(3, decay_epochs=0) == 0.0


def test_dice_bce_is_half_and_half_and_low_for_a_good_prediction():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 10
    bad = -good
    loss = DiceBCELoss()
    assert loss(good, target) < 0.01 < 0.9 < loss(bad, target)
    logits = torch.randn(2, 1, 8, 8)
    dice_only = DiceBCELoss(dice_weight=1.0, bce_weight=0.0)(logits, target)
    bce_only = DiceBCELoss(dice_weight=0.0, bce_weight=1.0)(logits, target)
    torch.testing.assert_close(loss(logits, target), 0.5 * dice_only + 0.5 * bce_only)
    with pytest.raises(ValueError, match="same shape"):
        loss(logits, target[:, :, :4])


def test_coarse_fine_loss_weights_the_two_outputs():
    target = (torch.rand(1, 1, 6, 6) > 0.5).float()
    coarse, final = torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6)
    plain = DiceBCELoss()
    loss = CoarseFineLoss(coarse_weight=0.25)
    expected = 0.25 * plain(coarse, target) + 0.75 * plain(final, target)
    torch.testing.assert_close(loss({"logits": final, "coarse_logits": coarse}, target), expected)
    loss.coarse_weight = 0.0
    torch.testing.assert_close(loss({"logits": final, "coarse_logits": coarse}, target), plain(final, target))
    torch.testing.assert_close(loss(final, target), plain(final, target))


def test_metrics_of_known_masks():
    target = np.zeros((40, 40), bool)
    target[10:20, 10:20] = True  # 100 px
    pred = np.zeros_like(target)
    pred[10:20, 15:25] = True  # overlaps 50 px
    m = binary_metrics(pred, target)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(50 / 150)
    # pred's right column (10 of its 36 edge pixels) lies 5 px from target's right edge: the 95th percentile
    # of both directed distances is 5
    assert m["hd95"] == pytest.approx(5.0)
    # band width round(0.02 * hypot(40, 40)) = 1: each band is its square's 36-pixel ring; the rings share
    # rows 10 and 19 at columns 15-19, 10 pixels, of a union of 62
    assert m["boundary_iou"] == pytest.approx(10 / 62)
    perfect = binary_metrics(target, target)
    assert perfect == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "boundary_iou": 1.0}


def test_dice_alone_is_binary_metrics_dice_for_numpy_and_torch():
    rng = np.random.default_rng(2)
    pred, target = rng.random((40, 30)) > 0.5, rng.random((40, 30)) > 0.6
    assert dice(pred, target) == pytest.approx(binary_metrics(pred, target)["dice"], rel=1e-6)
    assert dice(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx(dice(pred, target))
    assert dice(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0  # both empty, as binary_metrics
    assert dice(np.ones((4, 4), bool), np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="binary"):
        dice(np.full((4, 4), 0.5), np.zeros((4, 4)))


def test_boundary_iou_punishes_boundary_errors_more_than_iou():
    target = np.zeros((100, 100), bool)
    target[20:80, 20:80] = True
    pred = np.zeros_like(target)
    pred[22:78, 22:78] = True  # slightly shrunken
    m = binary_metrics(pred, target)
    assert m["iou"] > 0.85
    assert boundary_iou(pred, target) < m["iou"] - 0.2


def test_metrics_empty_masks_and_errors():
    empty = np.zeros((30, 40), bool)
    full = np.ones((30, 40), bool)
    assert binary_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "boundary_iou": 1.0}
    missed = binary_metrics(empty, full)
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(math.hypot(30, 40))
    with pytest.raises(ValueError, match="binary"):
        binary_metrics(np.full((4, 4), 0.7), full[:4, :4])
    with pytest.raises(ValueError, match="same shape"):
        binary_metrics(empty, full[:10])
    with pytest.raises(ValueError, match="2D"):
        binary_metrics(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
