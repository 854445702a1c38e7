"""Interactive inference: the cached predictor, prompts from clients, and 2D planes of images and volumes."""

from .planes import (
    ImageReadError,
    NonFiniteImageError,
    check_finite,
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
from .prediction import Prediction
from .predictor import Predictor, image_to_tensor
from .prompts import ROI_LAYOUTS, BoxPrompt, PromptError, normalize_roi, resolve_box_prompt, roi_to_box3d
from .volume import PropagationRule, VolumePrediction, VolumePredictor, check_volume, grow_click_mask
from .volume_prompts import ObjectPrompt, box3d_prompt, click_prompt, resolve_volume_prompts, slice_box_prompt

__all__ = [
    "Prediction",
    "Predictor",
    "image_to_tensor",
    "VolumePredictor",
    "VolumePrediction",
    "PropagationRule",
    "check_volume",
    "grow_click_mask",
    "ObjectPrompt",
    "ROI_LAYOUTS",
    "box3d_prompt",
    "slice_box_prompt",
    "click_prompt",
    "roi_to_box3d",
    "resolve_volume_prompts",
    "ENCODER_ENGINES",
    "OpenVINOEncoder",
    "resolve_encoder_engine",
    "BoxPrompt",
    "PromptError",
    "normalize_roi",
    "resolve_box_prompt",
    "ImageReadError",
    "NonFiniteImageError",
    "check_finite",
    "image_plane",
    "CT_WINDOW",
    "intensity_window",
    "is_picture",
    "label_plane",
    "load_image_array",
    "place_plane",
    "spatial_shape",
]
