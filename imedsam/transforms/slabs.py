"""Reading a slab of neighbouring slices (:func:`imedsam.data.slab_datalist`) as one multi-channel 2D item, so that
MONAI's spatial transforms move every slice of it alike."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .modalities import LoadModalityItemd

__all__ = ["LoadSlabd"]


class LoadSlabd(MapTransform):
    """Read an item of :func:`~imedsam.data.slab_datalist`: ``image`` becomes float32 ``(3 * D, H, W)`` in [0, 255]
    (slice after slice, each grey repeated to RGB) and ``label`` float32 ``(D, H, W)`` of 0/1, ``D`` the item's
    ``slab_depth`` from its ``slice``; each slice is read as :class:`~imedsam.transforms.LoadModalityItemd` reads
    one (the volume inference's plane and window).

    Spatial transforms then act on all channels alike; :class:`~imedsam.transforms.BoxFromMaskd` gives one box
    per slice (per label channel) and :class:`~imedsam.engine.PrepareSlabBatch` makes the batch ``D`` images per
    item for the network.
    """

    def __init__(self) -> None:
        super().__init__(("image", "label"))
        self._slice = LoadModalityItemd()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first, depth = int(d["slice"]), int(d["slab_depth"])
        slices = [self._slice({**d, "slice": k}) for k in range(first, first + depth)]
        for key in ("image", "label"):
            stacked = torch.cat([torch.as_tensor(s[key]) for s in slices])
            d[key] = MetaTensor(stacked, meta=dict(slices[0][key].meta))
        return d
