"""Transforms for box-prompted 2D segmentation."""

from .dictionary import BinarizeMaskd, BoxFromMaskd, EnsureRGBd, KeepForegroundd, ThresholdLogitsd
from .interactive import PromptPlaned, PromptVolumed
from .modalities import LoadModalityItemd
from .slabs import LoadSlabd

__all__ = ["BinarizeMaskd", "BoxFromMaskd", "EnsureRGBd", "KeepForegroundd", "LoadModalityItemd", "LoadSlabd", "PromptPlaned", "PromptVolumed", "ThresholdLogitsd"]
