"""Boxes from masks."""

from __future__ import annotations

import numpy as np

__all__ = ["box_from_mask", "box_iou"]


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box ``[x0, y0, x1, y1]`` (float32, pixel edges: ``x1 = last column + 1``) of a 2D mask's foreground."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask is empty: a box needs at least one foreground pixel")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def box_iou(a, b) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes (pixel edges); 0.0 when they do not overlap."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter = float(np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / union if union > 0 else 0.0
