"""Transforms for box-prompted 2D segmentation."""

from .dictionary import BinarizeMaskd, BoxFromMaskd, EnsureRGBd, KeepForegroundd, ThresholdLogitsd

__all__ = ["BinarizeMaskd", "BoxFromMaskd", "EnsureRGBd", "KeepForegroundd", "ThresholdLogitsd"]
