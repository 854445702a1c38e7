"""Transforms for box- and click-prompted segmentation."""

from .clicks import ClicksFromMaskd
from .dictionary import BinarizeMaskd, BoxFromMaskd, EnsureRGBd, KeepForegroundd, ThresholdLogitsd
from .interactive import PromptPlaned, PromptVolumed
from .modalities import LoadModalityItemd
from .slabs import LoadSlabd

__all__ = ["BinarizeMaskd", "BoxFromMaskd", "ClicksFromMaskd", "EnsureRGBd", "KeepForegroundd", "LoadModalityItemd", "LoadSlabd", "PromptPlaned", "PromptVolumed", "ThresholdLogitsd"]
