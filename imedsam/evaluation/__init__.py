"""Evaluation runners shared by scripts, the bundle and benchmarks: volumes under three prompt protocols, with
LiteMedSAM's CVPR 2024 recipe beside them."""

from .lite_medsam_3d import LiteMedSAMVolumeRecipe
from .volumes import PROTOCOLS, VolumeEvaluation, box3d_of, end_gaps, middle_slice_box, read_volume_datalist, surface_dice

__all__ = [
    "LiteMedSAMVolumeRecipe",
    "PROTOCOLS",
    "VolumeEvaluation",
    "box3d_of",
    "end_gaps",
    "middle_slice_box",
    "read_volume_datalist",
    "surface_dice",
]
