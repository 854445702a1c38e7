"""What the box prompt alone scores: the tight box filled, and the ellipse inscribed in it.

A box-prompted model has to beat these; they need no training and make every results table honest.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..data import box_from_mask, read_mask
from ..data.pictures import read_picture
from .binary import binary_metrics, summarize_metrics

__all__ = ["BASELINE_NAMES", "box_baseline_masks", "datalist_target", "frame_mask", "score_box_baselines"]

BASELINE_NAMES = ("box_filled", "ellipse_in_box")


def box_baseline_masks(target: np.ndarray) -> dict[str, np.ndarray]:
    """``{"box_filled": mask, "ellipse_in_box": mask}`` for the tight box of ``target`` (a 2D boolean mask)."""
    x0, y0, x1, y1 = box_from_mask(target)
    filled = np.zeros(target.shape, bool)
    filled[int(y0) : int(y1), int(x0) : int(x1)] = True
    yy, xx = np.mgrid[0 : target.shape[0], 0 : target.shape[1]] + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return {"box_filled": filled, "ellipse_in_box": ellipse}


def frame_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2D boolean mask in the bundle's evaluation frame: the longest side to ``size`` (bilinear, then
    ``>= 0.5``, as MONAI's ``Resized(size_mode="longest")`` rounds the sides), zeros padded at the bottom and
    right to ``size x size``."""
    height, width = mask.shape
    scale = size / max(height, width)
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    resized = Image.fromarray(mask.astype(np.float32)).resize((new_w, new_h), Image.BILINEAR)
    framed = np.zeros((size, size), bool)
    framed[:new_h, :new_w] = np.asarray(resized) >= 0.5
    return framed


def datalist_target(item: dict, size: int) -> np.ndarray:
    """The ground truth of a datalist item as the bundle evaluates it: the 0/1 mask (the item's organ for a
    multi-organ item) in the evaluation frame of ``size`` (:func:`frame_mask`)."""
    if "label_value" in item:
        mask = np.asarray(read_picture(item["label"], "label map")) == item["label_value"]
    else:
        mask = read_mask(item["label"])
    return frame_mask(mask, size)


def score_box_baselines(datalist: list[dict], size: int) -> dict[str, dict]:
    """Mean and std of each metric for each baseline over ``datalist`` at label size ``size``."""
    rows: dict[str, list[dict]] = {name: [] for name in BASELINE_NAMES}
    for item in datalist:
        target = datalist_target(item, size)
        for name, prediction in box_baseline_masks(target).items():
            rows[name].append(binary_metrics(prediction, target))
    return {name: {"count": len(values), **summarize_metrics(values)} for name, values in rows.items()}
