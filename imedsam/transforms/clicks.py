"""Click prompts drawn from the label, for training a model that takes clicks as well as boxes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable

from ..data.clicks import sample_clicks
from .dictionary import label_foreground

__all__ = ["ClicksFromMaskd"]


class ClicksFromMaskd(Randomizable, MapTransform):
    """Foreground clicks from the label, scaled to the image's pixels, beside the box of
    :class:`~imedsam.transforms.BoxFromMaskd`.

    Each channel of the label (``[C, h, w]``: one, or the slices of a slab) gets between 1 and ``max_clicks``
    clicks (the count drawn per channel), from :func:`~imedsam.data.sample_clicks` (inside the object more often
    than on its rim). They are stored as ``points [C, max_clicks, 2]`` (x, y; float32) and ``point_labels
    [C, max_clicks]`` (int64: 1 a click, -1 padding, whose position SAM's prompt encoder ignores), so that a
    batch collates. :class:`~imedsam.engine.PromptInferer` (``click_prob``) decides per batch whether the network is
    prompted by these clicks or by the box.

    MONAI's deepgrow ``AddInitialSeedPointd`` draws a similar seed, but writes it as a JSON string of
    channel-first indices, one per connected region, for deepgrow's guidance channels; the prompt encoder
    takes pixel coordinates.

    Example::

        >>> label = torch.zeros(1, 8, 8)
        >>> label[0, 2:6, 3:7] = 1
        >>> out = ClicksFromMaskd(max_clicks=2).set_random_state(0)({"image": torch.zeros(3, 16, 16), "label": label})
        >>> out["points"].shape, out["point_labels"].shape
        (torch.Size([1, 2, 2]), torch.Size([1, 2]))
    """

    def __init__(self, label_key: str = "label", image_key: str = "image", max_clicks: int = 3) -> None:
        MapTransform.__init__(self, [label_key])
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be at least 1, got {max_clicks}")
        self.label_key, self.image_key, self.max_clicks = label_key, image_key, int(max_clicks)

    def randomize(self, data=None) -> None:
        pass  # the draws depend on each label: __call__ makes them with self.R

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        # a click names a label pixel; its centre lands on the image pixel under that centre
        foreground, scale = label_foreground(d, self.label_key, self.image_key, "click")
        points = np.zeros((len(foreground), self.max_clicks, 2), np.float32)
        labels = np.full((len(foreground), self.max_clicks), -1, np.int64)
        for channel, plane in enumerate(foreground):
            count = int(self.R.randint(1, self.max_clicks + 1))
            clicks = sample_clicks(plane, count, self.R)
            points[channel, :count] = np.floor((clicks + 0.5) * scale)
            labels[channel, :count] = 1
        d["points"] = torch.from_numpy(points)
        d["point_labels"] = torch.from_numpy(labels)
        return d
