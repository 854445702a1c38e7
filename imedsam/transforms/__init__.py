"""Transforms for box-prompted 2D segmentation."""

from .dictionary import BinarizeMaskd, BoxFromMaskd, EnsureRGBd, KeepForegroundd, ThresholdLogitsd
from .interactive import PromptPlaned, PromptVolumed

__all__ = ["BinarizeMaskd", "BoxFromMaskd", "EnsureRGBd", "KeepForegroundd", "PromptPlaned", "PromptVolumed", "ThresholdLogitsd"]
