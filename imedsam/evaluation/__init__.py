"""Evaluation runners shared by scripts, the bundle and benchmarks: volumes under three prompt protocols, with
LiteMedSAM's CVPR 2024 recipe beside them, and the training-and-scoring runners of the active-learning study."""

from .active_learning_runs import BundleRunner, EmbeddingRunner
from .lite_medsam_3d import LiteMedSAMVolumeRecipe
from .volumes import PROTOCOLS, VolumeEvaluation, box3d_of, end_gaps, middle_slice_box, read_volume_datalist, surface_dice

__all__ = [
    "BundleRunner",
    "EmbeddingRunner",
    "LiteMedSAMVolumeRecipe",
    "PROTOCOLS",
    "VolumeEvaluation",
    "box3d_of",
    "end_gaps",
    "middle_slice_box",
    "read_volume_datalist",
    "surface_dice",
]
