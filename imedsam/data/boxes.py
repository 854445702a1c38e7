"""Boxes from masks."""

from __future__ import annotations

import numpy as np

__all__ = ["box_from_mask"]


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box ``[x0, y0, x1, y1]`` (float32, pixel edges: ``x1 = last column + 1``) of a 2D mask's foreground."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("mask is empty: a box needs at least one foreground pixel")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
