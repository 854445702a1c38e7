"""The implicit segmentation decoder: coarse INR, uncertainty-guided sampling, fine INR, at any output size."""

from .decoder import ImplicitSegmentationDecoder
from .plan import ImplicitDecoderOutput
from .reference import reference_decode

__all__ = ["ImplicitDecoderOutput", "ImplicitSegmentationDecoder", "reference_decode"]
