"""Clicks from masks: the centre click an evaluation simulates, and the random clicks training draws."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

__all__ = ["click_from_mask", "sample_clicks"]


def _foreground_distance(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: a click needs at least one foreground pixel")
    # padded so that the image border counts as background: a click then keeps away from a cut-off edge too
    return distance_transform_edt(np.pad(mask > 0, 1))[1:-1, 1:-1]


def click_from_mask(mask: np.ndarray) -> np.ndarray:
    """The click a person aiming at the middle of the object makes: ``[x, y]`` (float32, pixel indices) of the
    foreground pixel farthest from the background (the first in row order among equals), as interactive
    segmentation benchmarks simulate a first click.

    Example::

        >>> mask = np.zeros((7, 8), bool)
        >>> mask[1:6, 2:7] = True
        >>> click_from_mask(mask).tolist()
        [4.0, 3.0]
    """
    distance = _foreground_distance(mask)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([x, y], dtype=np.float32)


def sample_clicks(mask: np.ndarray, count: int, rng: np.random.RandomState) -> np.ndarray:
    """``count`` random foreground clicks ``[count, 2]`` (x, y; float32), drawn without replacement (as far as
    the foreground allows) with probability proportional to the distance from the background: clicks fall
    inside the object more often than on its rim, as people click."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    field = _foreground_distance(mask)
    distance = field.ravel()
    candidates = np.flatnonzero(distance)
    weights = distance[candidates] / distance[candidates].sum()
    chosen = rng.choice(candidates, size=min(count, candidates.size), replace=False, p=weights)
    if chosen.size < count:  # a foreground of fewer pixels than clicks: repeat some
        chosen = np.concatenate([chosen, rng.choice(chosen, size=count - chosen.size)])
    ys, xs = np.unravel_index(chosen, field.shape)
    return np.stack([xs, ys], axis=1).astype(np.float32)
