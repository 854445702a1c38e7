"""Data helpers: datalists of image/mask folders, seeded splits, synthetic demo data, boxes from masks."""

from .boxes import box_from_mask, box_iou
from .clicks import click_from_mask, sample_clicks
from .datalist import image_datalist, polyp_datalist, read_label_names, read_mask
from .modalities import (
    DICOM_MODALITIES,
    MODALITIES,
    ModalityBalancedSampler,
    default_modality_split_file,
    modality_datalist,
    modality_sample_weights,
    normalize_modality,
    read_modality_split,
)
from .slabs import slab_datalist
from .splits import seeded_split
from .synthetic import synthetic_polyp, write_synthetic_dataset

__all__ = ["box_from_mask", "box_iou", "click_from_mask", "sample_clicks", "image_datalist", "polyp_datalist", "read_label_names", "read_mask", "seeded_split", "synthetic_polyp", "write_synthetic_dataset",
           "DICOM_MODALITIES", "MODALITIES", "ModalityBalancedSampler", "default_modality_split_file", "modality_datalist",
           "modality_sample_weights", "normalize_modality", "read_modality_split", "slab_datalist"]
