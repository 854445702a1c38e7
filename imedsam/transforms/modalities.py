"""Reading an item of the all-modality datalist (:func:`imedsam.data.modality_datalist`) as the bundle's loader
reads a picture: one object in one 2D plane."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..data.arrays import cached_image_array, read_picture_array
from ..data.intensity import MODALITY_RULES, intensity_window
from ..data.pictures import ImageReadError
from ..inference.planes import image_plane, label_plane
from .dictionary import BinarizeMaskd, EnsureRGBd

__all__ = ["LoadModalityItemd"]


@functools.lru_cache(maxsize=16)
def _cached_window(path: str, modality: str | None) -> tuple[float, float]:
    return intensity_window(cached_image_array(path, False), modality=modality if modality in MODALITY_RULES else None)


class LoadModalityItemd(MapTransform):
    """Read an item of :func:`modality_datalist`: ``image`` becomes float32 ``(3, H, W)`` in [0, 255] (grey repeated
    to RGB) and ``label`` float32 ``(1, H, W)`` of 0/1, ``H`` rows and ``W`` columns; the other keys stay.

    - pictures: exactly what ``LoadImaged(reader=PILReader, reverse_indexing=False, ensure_channel_first=True)``,
      :class:`~imedsam.transforms.EnsureRGBd` and :class:`~imedsam.transforms.BinarizeMaskd` (``> threshold``)
      give, as bundle/configs/train.yaml reads pictures;
    - instance maps (``item["instance"]``): the foreground is ``id == instance``, and image and label are cut to
      ``item["crop"]``;
    - volume slices (``item["slice"]``): the plane of :func:`imedsam.inference.planes.image_plane` at ``K`` with
      the volume inference's window (:func:`imedsam.data.intensity.intensity_window` for the item's modality:
      CT L40/W400, MR percentiles) times 255, and :func:`~imedsam.inference.planes.label_plane` of the object's
      label values. Volumes (and one-image sets) are decoded once per process (an LRU of 16 files).

    The tensors are ``MetaTensor`` with ``filename_or_obj`` in their meta, the same keys for every kind, so items
    of different sets batch together. Unreadable files are ``ImageReadError`` naming the file.
    """

    def __init__(self, threshold: float = 127) -> None:
        super().__init__(("image", "label"))
        self.threshold = threshold
        self._rgb = EnsureRGBd("image")
        self._binarize = BinarizeMaskd("label", threshold=threshold, value_key="instance")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_path, label_path = str(d["image"]), str(d["label"])
        if d.get("slice") is not None:
            image, label = self._volume(d, image_path, label_path)
        else:
            crop = d.get("crop")
            if crop is not None:
                image, label = read_picture_array(image_path), read_picture_array(label_path)
                y0, y1, x0, x1 = (int(v) for v in crop)
                image, label = image[:, y0:y1, x0:x1], label[:, y0:y1, x0:x1]
            else:
                image, label = read_picture_array(image_path), read_picture_array(label_path)
            if image.shape[1:] != label.shape[1:]:
                raise ImageReadError(f"image {image_path} is {image.shape[1:]} (H, W) but its label {label_path} is {label.shape[1:]}")
            step = {"image": _meta(image, image_path), "label": _meta(label, label_path), "instance": d.get("instance")}
            step = self._binarize(self._rgb(step))
            image, label = step["image"], step["label"]
        d["image"], d["label"] = image, label
        return d

    @staticmethod
    def _volume(d: Mapping, image_path: str, label_path: str):
        k = int(d["slice"])
        volume, labels = cached_image_array(image_path, False), cached_image_array(label_path, False)
        if volume.shape != labels.shape:
            raise ImageReadError(f"volume {image_path} is {volume.shape} but its label {label_path} is {labels.shape}")
        values = d.get("label_values")
        if not values:
            raise ValueError(f"volume item {d.get('name', image_path)} has no label_values")
        window = _cached_window(image_path, d.get("modality"))
        plane = image_plane(volume, False, k, window=window)  # J x I x 3 in [0, 1]
        if not 0 <= k < labels.shape[2]:
            raise ImageReadError(f"slice {k} is not in the label volume {label_path} of shape {labels.shape}")
        mask = label_plane(np.isin(labels[:, :, k : k + 1], values), False, 0)  # J x I
        image = np.ascontiguousarray(plane.transpose(2, 0, 1) * np.float32(255.0), dtype=np.float32)
        return _meta(image, image_path), _meta(mask[None].astype(np.float32), label_path)


def _meta(array: np.ndarray, path: str):
    return MetaTensor(torch.from_numpy(np.array(array, dtype=np.float32)), meta={"filename_or_obj": path})


