"""The I-MedSAM network and its parts."""

from .box_proposal import BoxProposal, BoxProposalHead, boxes_from_foreground
from .checkpoint import CheckpointError, load_sam_checkpoint, read_state_dict, resize_sam_state_dict
from .adapters.frequency import FrequencyAdapter, frequency_image
from .encoders.sam_vit import AdaptedImageEncoder
from .implicit.decoder import ImplicitDecoderOutput, ImplicitSegmentationDecoder
from .imedsam import IMedSAM, IMedSAMBoxMask, IMedSAMOutput, ImageEncoding
from .adapters.lora import LoRAQKV
from .presets import ENCODER_PRESETS, OFFICIAL_SAM_CHECKPOINTS, build_sam_parts
from .prompts.box_path import BoxPromptPath

__all__ = [
    "AdaptedImageEncoder",
    "BoxPromptPath",
    "BoxProposal",
    "BoxProposalHead",
    "CheckpointError",
    "ENCODER_PRESETS",
    "FrequencyAdapter",
    "IMedSAM",
    "IMedSAMBoxMask",
    "IMedSAMOutput",
    "ImageEncoding",
    "ImplicitDecoderOutput",
    "ImplicitSegmentationDecoder",
    "LoRAQKV",
    "OFFICIAL_SAM_CHECKPOINTS",
    "boxes_from_foreground",
    "build_sam_parts",
    "frequency_image",
    "load_sam_checkpoint",
    "read_state_dict",
    "resize_sam_state_dict",
]
