"""Dictionary transforms for box-prompted 2D segmentation."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from ..data.boxes import box_from_mask

__all__ = ["EnsureRGBd", "BinarizeMaskd", "BoxFromMaskd", "KeepForegroundd", "ThresholdLogitsd"]

logger = logging.getLogger(__name__)


def _source(data: Mapping, key: Hashable) -> str:
    meta = getattr(data.get(key), "meta", {}) or {}
    return str(meta.get("filename_or_obj", data.get("name", key)))


def label_foreground(data: Mapping, label_key: Hashable, image_key: Hashable, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """The foreground of each channel of ``data[label_key]`` (``[C, h, w]`` bool; an empty channel is an error
    naming the file, since a ``prompt`` needs foreground) and the ``(x, y)`` scale from the label's pixels to
    the image's (``data[image_key]``), which may differ in size."""
    label = data[label_key]
    foreground = np.asarray(torch.as_tensor(label).cpu() > 0)
    for channel, plane in enumerate(foreground):
        if not plane.any():
            where = "" if len(foreground) == 1 else f" (channel {channel})"
            raise ValueError(f"empty mask for {_source(data, label_key)}{where}: a {prompt} prompt needs foreground")
    height, width = label.shape[-2:]
    image_h, image_w = data[image_key].shape[-2:]
    return foreground, np.array([image_w / width, image_h / height])


class EnsureRGBd(MapTransform):
    """Channel-first images as 3 channels: grey is repeated; anything but 1 or 3 channels is an error."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            channels = d[key].shape[0]
            if channels == 1:
                d[key] = d[key].repeat(3, 1, 1)
            elif channels != 3:
                raise ValueError(f"{_source(d, key)} has {channels} channels; I-MedSAM reads RGB or grey images")
        return d


class BinarizeMaskd(MapTransform):
    """A channel-first mask as one float channel of 0/1, foreground ``> threshold`` (127 for 8-bit masks).

    Masks saved as RGB with equal channels are accepted; a mask whose channels differ is an error, since
    it is not clear which one is the label. An item that carries ``value_key`` (a multi-organ datalist item,
    see :func:`imedsam.data.polyp_datalist`) has a label map instead: its foreground is ``== value``.
    """

    def __init__(
        self, keys: KeysCollection, threshold: float = 127, value_key: str = "label_value", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold
        self.value_key = value_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        value = d.get(self.value_key)
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.shape[0] not in (1, 3):
                raise ValueError(f"mask {_source(d, key)} has {mask.shape[0]} channels; expected 1 (or 3 equal ones)")
            if mask.shape[0] == 3 and not (torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])):
                raise ValueError(f"mask {_source(d, key)} is a colour image; save the label as one grey channel")
            foreground = mask[:1] > self.threshold if value is None else mask[:1] == value
            d[key] = foreground.to(torch.float32)
        return d


class BoxFromMaskd(Randomizable, MapTransform):
    """The box prompt from the label: the tight box of its foreground, in pixels of the image.

    The box is found on the label (channel-first ``[1, H, W]``) and scaled to the image's frame, so label and
    image may have different sizes (evaluation at a label size other than the encoder's). In training each
    side moves outward by a random 0..``jitter`` label pixels, as in the official code, then is clipped to
    the image. The result is ``[1, 4]`` float32 (x0, y0, x1, y1), stored under ``box_key``. A label of ``C``
    channels (the slices of a slab, :class:`~imedsam.transforms.LoadSlabd`) gives ``[C, 4]``, a box per channel,
    each with its own jitter.
    """

    def __init__(
        self, label_key: str = "label", image_key: str = "image", box_key: str = "box", jitter: int = 0
    ) -> None:
        MapTransform.__init__(self, [label_key])
        self.label_key, self.image_key, self.box_key = label_key, image_key, box_key
        self.jitter = int(jitter)
        self._offsets = np.zeros((1, 4))

    def randomize(self, data=None) -> None:
        channels = 1 if data is None else int(data)
        self._offsets = self.R.randint(0, self.jitter + 1, size=(channels, 4)) if self.jitter > 0 else np.zeros((channels, 4))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        foreground, scale = label_foreground(d, self.label_key, self.image_key, "box")
        self.randomize(len(foreground))
        height, width = foreground.shape[-2:]
        scale = np.tile(scale, 2)
        boxes = []
        for plane, offsets in zip(foreground, self._offsets):
            grown = box_from_mask(plane) + offsets * np.array([-1, -1, 1, 1])
            boxes.append(np.clip(grown, 0, [width, height, width, height]) * scale)
        d[self.box_key] = torch.as_tensor(np.stack(boxes), dtype=torch.float32)
        return d


class KeepForegroundd(Randomizable, Transform):
    """Apply a random (spatial) transform, drawing again when it pushes the whole label out of the image (any
    channel's label: each slice of a slab needs its foreground for its box).

    Foreground is what ``AsDiscreted(threshold=threshold)`` keeps later: a label above ``threshold``. A bilinear
    rotation or zoom spreads a nucleus of a few pixels into values below 0.5, which a test for anything above 0
    let through to an empty mask and a failed training run.

    After ``tries`` draws that all lose the foreground, the sample is returned untransformed and a warning is
    logged: the official code resampled in a loop; an unbounded loop is not acceptable in a data loader.
    """

    def __init__(self, transform: Transform, label_key: str = "label", tries: int = 5, threshold: float = 0.5) -> None:
        self.transform = transform
        self.label_key = label_key
        self.tries = tries
        self.threshold = threshold

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping) -> dict:
        for _ in range(self.tries):
            out = self.transform(dict(data))
            label = torch.as_tensor(out[self.label_key])
            if (label.reshape(label.shape[0], -1) > self.threshold).any(dim=1).all():  # every channel: each slice of a slab
                return out
        logger.warning("augmentation lost the foreground of %s %d times; using the sample unaugmented",
                       _source(data, self.label_key), self.tries)
        return dict(data)


class ThresholdLogitsd(MapTransform):
    """Binarise the logit channels of a prediction (logit > 0, i.e. probability > 0.5).

    With ``with_uncertainty`` the prediction is ``[2N, H, W]`` (N logit maps, then N uncertainty maps, as
    :class:`~imedsam.engine.PromptInferer` returns them) and only the first half is binarised.
    """

    def __init__(self, keys: KeysCollection, with_uncertainty: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.with_uncertainty = with_uncertainty

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            n = pred.shape[0] // 2 if self.with_uncertainty else pred.shape[0]
            d[key] = torch.cat([(pred[:n] > 0).to(pred.dtype), pred[n:]], dim=0)
        return d
