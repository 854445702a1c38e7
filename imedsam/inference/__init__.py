"""Interactive inference: the cached predictor, prompts from clients, and 2D planes of images and volumes."""

from .planes import (
    ImageReadError,
    image_plane,
    CT_WINDOW,
    intensity_window,
    is_picture,
    label_plane,
    load_image_array,
    place_plane,
    spatial_shape,
)
from .openvino_encoder import ENCODER_ENGINES, OpenVINOEncoder, resolve_encoder_engine
from .predictor import Predictor, image_to_tensor
from .prompts import BoxPrompt, PromptError, normalize_roi, resolve_box_prompt

__all__ = [
    "Predictor",
    "image_to_tensor",
    "ENCODER_ENGINES",
    "OpenVINOEncoder",
    "resolve_encoder_engine",
    "BoxPrompt",
    "PromptError",
    "normalize_roi",
    "resolve_box_prompt",
    "ImageReadError",
    "image_plane",
    "CT_WINDOW",
    "intensity_window",
    "is_picture",
    "label_plane",
    "load_image_array",
    "place_plane",
    "spatial_shape",
]
