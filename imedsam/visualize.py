"""Overlay pictures: image, ground-truth contour, prediction, box and uncertainty heat map."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_erosion

__all__ = ["contour", "heat_map", "overlay"]


def contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~binary_erosion(mask, border_value=0)


def heat_map(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """``H x W`` non-negative values -> ``H x W x 3`` uint8, black-red-yellow-white, scaled to ``vmax``."""
    values = np.asarray(values, dtype=np.float32)
    top = float(values.max()) if vmax is None else vmax
    scaled = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    rgb = np.stack([np.clip(3 * scaled, 0, 1), np.clip(3 * scaled - 1, 0, 1), np.clip(3 * scaled - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def overlay(
    image: np.ndarray,
    prediction: np.ndarray,
    box=None,
    target: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
) -> np.ndarray:
    """Side-by-side picture: the image with the prediction tinted blue, the ground-truth contour in green and
    the box (``[4]``) or boxes (``[N, 4]``, ``x0, y0, x1, y1``) in yellow; then, if given, the uncertainty heat
    map. All maps must have the image's size."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    shown = image.astype(np.float32)
    predicted = np.asarray(prediction, dtype=bool)
    if predicted.shape != image.shape[:2]:
        raise ValueError(f"prediction {predicted.shape} and image {image.shape[:2]} must have the same size")
    shown[predicted] = 0.55 * shown[predicted] + 0.45 * np.array([40, 90, 255])
    if target is not None:
        shown[contour(target)] = (0, 255, 0)
    panel = Image.fromarray(shown.clip(0, 255).astype(np.uint8))
    if box is not None:
        draw = ImageDraw.Draw(panel)
        for x0, y0, x1, y1 in np.asarray(box, dtype=np.float64).reshape(-1, 4):
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 220, 0), width=2)
    panels = [np.asarray(panel)]
    if uncertainty is not None:
        panels.append(heat_map(uncertainty))
    return np.concatenate(panels, axis=1)
