"""Per-image uncertainty scores that rank unlabeled images for annotation (active learning)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ENTROPY_FLOOR", "mc_dropout_entropy", "ugs_score"]

# MONAI Label's epistemic scoring raises each pass's values at or below 0 to this before averaging.
ENTROPY_FLOOR = 5e-5


def _as_array(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float32)


def ugs_score(uncertainty, mask, box: Sequence[float]) -> float:
    """Mean UGS variance over the predicted region inside the box (the whole box if nothing is predicted).

    Args:
        uncertainty: ``[H, W]`` MC-dropout variance of the implicit decoder's logit.
        mask: ``[H, W]`` predicted foreground (bool or 0/1).
        box: ``[x0, y0, x1, y1]`` in pixels of the ``H x W`` grid (pixel edges).

    Averaging over the prediction measures how unsure the model is about the object it segments, not
    about background far from it.

    Example::

        >>> variance = np.zeros((8, 8)); variance[2:4, 2:4] = 1.0
        >>> ugs_score(variance, variance > 0, [2, 2, 6, 6])
        1.0
    """
    uncertainty, mask = _as_array(uncertainty), _as_array(mask).astype(bool)
    if uncertainty.ndim != 2 or uncertainty.shape != mask.shape:
        raise ValueError(f"uncertainty and mask must be H x W maps of one shape, got {uncertainty.shape} and {mask.shape}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    height, width = mask.shape
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {list(box)} has no pixel inside the {height} x {width} map")
    inside = np.zeros(mask.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    region = inside & mask
    if not region.any():
        region = inside
    return float(uncertainty[region].mean())


def mc_dropout_entropy(probabilities) -> float:
    """MONAI Label's epistemic score of one image from ``T`` MC-dropout foreground probability maps.

    ``probabilities`` is ``[T, H, W]`` (sigmoid outputs of ``T >= 2`` stochastic passes). The arithmetic is
    that of ``EpistemicScoring.entropy_3d_volume`` (``monailabel.tasks.scoring.epistemic``) for a one-channel
    output, in float32: each pass's values at or below 0 are raised to :data:`ENTROPY_FLOOR` (values above 0,
    however small, are kept), the passes are averaged per pixel, ``-p log p`` of the average is taken, and the
    image's score is its mean over all pixels (``nanmean``, as MONAI Label takes it).

    Example::

        >>> round(mc_dropout_entropy(np.full((4, 2, 2), 0.5)), 6)
        0.346574
    """
    samples = _as_array(probabilities).astype(np.float32, copy=True)
    if samples.ndim != 3 or samples.shape[0] < 2:
        raise ValueError(f"probabilities must be T x H x W with T >= 2 passes, got shape {samples.shape}")
    if samples.min() < 0 or samples.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]: apply the sigmoid to the logits first")
    samples[samples <= 0] = ENTROPY_FLOOR
    mean = np.divide(np.sum(samples, axis=0), samples.shape[0])
    return float(np.nanmean(-np.multiply(mean, np.log(mean))))
