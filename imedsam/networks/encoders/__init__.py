"""Image encoders: SAM's ViT and LiteMedSAM's TinyViT, frozen, with LoRA and the Frequency Adapter."""

from .lite_medsam import LITE_MEDSAM_IMAGE_SIZE, LiteMedSAMReference, build_lite_medsam_parts
from .sam_vit import AdaptedImageEncoder
from .tiny_vit import AdaptedTinyViT, letterbox

__all__ = [
    "AdaptedImageEncoder",
    "AdaptedTinyViT",
    "LITE_MEDSAM_IMAGE_SIZE",
    "LiteMedSAMReference",
    "build_lite_medsam_parts",
    "letterbox",
]
