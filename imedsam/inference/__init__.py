"""Interactive inference."""

from .predictor import Predictor, image_to_tensor

__all__ = ["Predictor", "image_to_tensor"]
