"""Data helpers: synthetic demo data and box extraction."""

from .boxes import box_from_mask
from .synthetic import synthetic_polyp, write_synthetic_dataset

__all__ = ["box_from_mask", "synthetic_polyp", "write_synthetic_dataset"]
