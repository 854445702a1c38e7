"""Segmentation metrics."""

from .binary import METRIC_NAMES, binary_metrics, boundary_iou

__all__ = ["METRIC_NAMES", "binary_metrics", "boundary_iou"]
