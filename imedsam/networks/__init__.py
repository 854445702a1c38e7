"""The I-MedSAM network and its parts: ``build_imedsam`` makes one from a preset; ``IMedSAM`` puts parts together.

Subpackages: ``encoders`` (SAM's ViT, LiteMedSAM's TinyViT), ``adapters`` (LoRA, the Frequency Adapter),
``prompts`` (the :class:`Prompts` value and the box prompt path) and ``implicit`` (the implicit segmentation decoder).
"""

from .adapters.frequency import FrequencyAdapter, frequency_image
from .adapters.lora import LoRAQKV
from .box_proposal import BoxProposal, BoxProposalHead, boxes_from_foreground
from .build import build_imedsam
from .checkpoint import CheckpointError, load_sam_checkpoint, read_state_dict, resize_sam_state_dict
from .encoders.sam_vit import AdaptedImageEncoder
from .encoders.tiny_vit import AdaptedTinyViT
from .box_mask import IMedSAMBoxMask
from .imedsam import IMedSAM, IMedSAMOutput, ImageEncoding
from .implicit.decoder import ImplicitDecoderOutput, ImplicitSegmentationDecoder
from .presets import ENCODER_PRESETS, IMEDSAM_PRESETS, OFFICIAL_SAM_CHECKPOINTS, build_sam_parts
from .prompts.box_path import BoxPromptPath
from .prompts.prompts import Prompts, as_prompts
from .weights import WEIGHT_SETS, WeightSet

__all__ = [
    "AdaptedImageEncoder",
    "AdaptedTinyViT",
    "BoxPromptPath",
    "BoxProposal",
    "BoxProposalHead",
    "CheckpointError",
    "ENCODER_PRESETS",
    "FrequencyAdapter",
    "IMEDSAM_PRESETS",
    "IMedSAM",
    "IMedSAMBoxMask",
    "IMedSAMOutput",
    "ImageEncoding",
    "ImplicitDecoderOutput",
    "ImplicitSegmentationDecoder",
    "LoRAQKV",
    "OFFICIAL_SAM_CHECKPOINTS",
    "Prompts",
    "WEIGHT_SETS",
    "WeightSet",
    "boxes_from_foreground",
    "build_imedsam",
    "as_prompts",
    "build_sam_parts",
    "frequency_image",
    "load_sam_checkpoint",
    "read_state_dict",
    "resize_sam_state_dict",
]
