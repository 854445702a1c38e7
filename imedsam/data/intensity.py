"""Intensity rules that map a volume's values to the model's [0, 1] input, as LiteMedSAM's data was prepared."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .modalities import normalize_modality
from .pictures import ImageReadError

__all__ = ["CT_WINDOW", "CT_AIR_THRESHOLD", "MODALITY_RULES", "intensity_rule", "intensity_window"]

#: LiteMedSAM's CT window, level 40 / width 400 HU, in (low, high) form
CT_WINDOW = (-160.0, 240.0)
#: a volume with values this low is CT in Hounsfield units (air is -1000); MR intensities are not negative
CT_AIR_THRESHOLD = -500.0
#: the ``modality`` values :func:`intensity_window` understands; None guesses from the values
MODALITY_RULES = ("ct", "mr")


def intensity_rule(modality: str | None) -> str | None:
    """The ``modality`` argument of :func:`intensity_window` for an image's modality (a name of
    :data:`imedsam.data.MODALITIES` or a DICOM code, see :func:`imedsam.data.normalize_modality`).

    CT gets the CT rule; any other given modality the percentile rule (``"mr"``: only CT is in Hounsfield units);
    None stays None (guess from the values). An unknown value is a ``ValueError`` naming it.

    >>> intensity_rule("CT"), intensity_rule("PT"), intensity_rule("endoscopy"), intensity_rule(None)
    ('ct', 'mr', 'mr', None)
    """
    name = normalize_modality(modality)
    if name is None:
        return None
    return "ct" if name == "ct" else "mr"


def _percentile_window(sample: np.ndarray, volume) -> tuple[float, float]:
    nonzero = sample[sample != 0]
    low, high = np.percentile(nonzero if nonzero.size else sample, [0.5, 99.5])
    if not high > low:
        low, high = float(np.min(volume)), float(np.max(volume))
    return float(low), (float(high) if high > low else float(low) + 1.0)


def intensity_window(
    volume: np.ndarray, window: Sequence[float] | None = None, modality: str | None = None
) -> tuple[float, float]:
    """``(low, high)`` intensity range of a volume, by LiteMedSAM's conventions unless ``window`` is given.

    - ``window=(low, high)`` is used as it is;
    - ``modality="ct"``: the soft-tissue window L40/W400 (-160..240 HU);
    - ``modality="mr"`` (and any non-CT data): the 0.5 and 99.5 percentiles of the non-zero voxels;
    - ``modality=None``: CT when the volume holds air (values at or below -500), else the percentile rule.

    The volume is read at every 4th voxel along each axis, which changes the percentiles by a negligible amount
    and keeps a large volume fast to prompt.
    """
    if window is not None:
        try:
            low, high = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ImageReadError(f"window must be [low, high], got {window!r}") from None
        if not high > low:
            raise ImageReadError(f"window must have low < high, got {window!r}")
        return low, high
    if modality is not None and modality not in MODALITY_RULES:
        raise ImageReadError(f"modality must be one of {MODALITY_RULES} or None (guess from the values), got {modality!r}")
    if modality == "ct":
        return CT_WINDOW
    sample = np.asarray(volume)[::4, ::4, ::4] if np.ndim(volume) == 3 else np.asarray(volume)
    sample = sample[np.isfinite(sample)] if np.issubdtype(sample.dtype, np.floating) else sample
    if modality is None and sample.size and sample.min() <= CT_AIR_THRESHOLD:
        return CT_WINDOW
    return _percentile_window(sample, sample if sample.size else volume)
