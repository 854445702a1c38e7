"""Training losses."""

from .coarse_fine import CoarseFineLoss, DiceBCELoss, coarse_weight_at

__all__ = ["CoarseFineLoss", "DiceBCELoss", "coarse_weight_at"]
