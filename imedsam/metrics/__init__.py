"""Segmentation metrics, and the scores of the box prompt alone."""

from .baselines import BASELINE_NAMES, box_baseline_masks, datalist_target, score_box_baselines
from .binary import METRIC_NAMES, binary_metrics, boundary_iou, summarize_metrics

__all__ = ["BASELINE_NAMES", "METRIC_NAMES", "binary_metrics", "box_baseline_masks", "boundary_iou", "datalist_target", "score_box_baselines", "summarize_metrics"]
