"""Per-image metrics of a binary mask: Dice, IoU, 95% Hausdorff distance and Boundary IoU."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from scipy.ndimage import distance_transform_edt

__all__ = ["METRIC_NAMES", "binary_metrics", "boundary_iou", "dice", "summarize_metrics"]

METRIC_NAMES = ("dice", "iou", "hd95", "boundary_iou")


def _as_bool(mask, name: str) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2D H x W mask, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool); threshold probabilities first")
    return array.astype(bool)


def _inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    # Pixels of the mask within `width` of the background (the image border counts as background).
    padded = np.pad(mask, 1)
    return mask & (distance_transform_edt(padded)[1:-1, 1:-1] <= width)


def dice(pred, target) -> float:
    """Dice of two ``H x W`` binary masks (bool or 0/1, numpy or torch); 1.0 when both are empty, as in
    :func:`binary_metrics`. Without the other metrics, for loops that score many masks."""
    pred, target = _as_bool(pred, "pred"), _as_bool(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, target).sum()) / total


def boundary_iou(pred, target, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al., CVPR 2021): IoU of the bands of width ``d`` inside each contour,
    ``d = max(1, round(dilation_ratio * image diagonal))``. 1.0 when both masks are empty."""
    pred, target = _as_bool(pred, "pred"), _as_bool(target, "target")
    width = max(1, int(round(dilation_ratio * math.hypot(*target.shape))))
    p, t = _inner_boundary(pred, width), _inner_boundary(target, width)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def binary_metrics(pred, target, dilation_ratio: float = 0.02) -> dict[str, float]:
    """Dice, IoU, HD95 (pixels of the mask grid) and Boundary IoU of two ``H x W`` binary masks.

    Dice and IoU come from MONAI, HD95 from MONAI's ``compute_hausdorff_distance(percentile=95)``.
    Empty masks, which MONAI leaves undefined: both empty is a perfect score (HD95 0); exactly one empty
    scores Dice/IoU 0 and HD95 = the image diagonal, the largest distance possible on the grid.
    """
    pred_np, target_np = _as_bool(pred, "pred"), _as_bool(target, "target")
    if pred_np.shape != target_np.shape:
        raise ValueError(f"pred {pred_np.shape} and target {target_np.shape} must have the same shape")
    diagonal = math.hypot(*target_np.shape)
    if not pred_np.any() or not target_np.any():
        both = not pred_np.any() and not target_np.any()
        score = 1.0 if both else 0.0
        return {"dice": score, "iou": score, "hd95": 0.0 if both else diagonal, "boundary_iou": score}
    p = torch.from_numpy(pred_np)[None, None].float()
    t = torch.from_numpy(target_np)[None, None].float()
    return {
        "dice": float(compute_dice(p, t, include_background=True)),
        "iou": float(compute_iou(p, t, include_background=True)),
        "hd95": float(compute_hausdorff_distance(p, t, include_background=True, percentile=95)),
        "boundary_iou": boundary_iou(pred_np, target_np, dilation_ratio),
    }


def summarize_metrics(rows: list[dict]) -> dict[str, dict | None]:
    """``{metric: {"mean", "std"}}`` over rows of :func:`binary_metrics` (``None`` for no rows)."""
    out: dict[str, dict | None] = {}
    for metric in METRIC_NAMES:
        values = np.array([row[metric] for row in rows], dtype=np.float64)
        out[metric] = {"mean": float(values.mean()), "std": float(values.std())} if len(values) else None
    return out
