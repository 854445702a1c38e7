"""Segmentation metrics, the scores of the box prompt alone, and per-image uncertainty scores."""

from .baselines import BASELINE_NAMES, box_baseline_masks, datalist_target, score_box_baselines
from .binary import METRIC_NAMES, binary_metrics, boundary_iou, dice, summarize_metrics
from .uncertainty import ENTROPY_FLOOR, mc_dropout_entropy, ugs_score

__all__ = [
    "BASELINE_NAMES",
    "ENTROPY_FLOOR",
    "METRIC_NAMES",
    "binary_metrics",
    "box_baseline_masks",
    "boundary_iou",
    "datalist_target",
    "dice",
    "mc_dropout_entropy",
    "score_box_baselines",
    "summarize_metrics",
    "ugs_score",
]
