"""Slices of a volume encoded a slab at a time, for a model whose encoder sees neighbouring slices
(3DSAM-adapter's volumetric adapters, :class:`~imedsam.networks.adapters.volumetric.VolumetricAdapters`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from ..networks.imedsam import ImageEncoding
from .predictor import Predictor, image_to_tensor

__all__ = ["SlabEncoder", "slab_start"]


def slab_start(k: int, slab_depth: int, depth: int) -> int:
    """The first slice of the slab that encodes slice ``k`` of a volume of ``depth`` slices: slabs tile the volume
    from slice 0 in steps of ``slab_depth``, and the last one ends at the volume's end (it then overlaps the one
    before it), so that every slab is whole and each slice is encoded in one slab, always the same one.

    Example::

        >>> [slab_start(k, 5, 12) for k in range(12)]
        [0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 7, 7]
    """
    if not 0 <= k < depth:
        raise IndexError(f"slice {k} is outside the volume's {depth} slices")
    slab_depth = min(slab_depth, depth)
    return min((k // slab_depth) * slab_depth, depth - slab_depth)


class SlabEncoder:
    """Encode a volume's slices a slab of ``model.slab_depth`` neighbours at a time, and keep the encodings.

    Each slice's encoding depends on its slab, so slabs, not slices, are cached: by the slab's first slice and
    the encoder's weights (:meth:`~imedsam.networks.IMedSAM.encoder_version`). The encoder runs where the
    ``predictor`` runs its own (OpenVINO or PyTorch, see :class:`~imedsam.inference.Predictor`), with one graph
    compiled per slab depth. A volume with fewer slices than the slab depth is one slab of all of them.

    Args:
        predictor: the session's 2D predictor, whose model, engine and ``encoder_calls`` count are used.
        plane: slice ``k`` -> the ``H x W x 3`` float image in [0, 1] the model sees.
        depth: the volume's number of slices.
        cache_slices: slices kept (whole slabs).
    """

    def __init__(self, predictor: Predictor, plane: Callable[[int], np.ndarray], depth: int, cache_slices: int = 384) -> None:
        self.predictor = predictor
        self.plane = plane
        self.depth = depth
        self.slab_depth = min(predictor.model.slab_depth, depth)
        self.cache_slabs = max(1, cache_slices // self.slab_depth)
        self._slabs: OrderedDict[tuple, list[ImageEncoding]] = OrderedDict()

    def encoding(self, k: int) -> tuple[ImageEncoding, bool]:
        """Slice ``k``'s encoding, and whether it came from the cache."""
        start = slab_start(k, self.slab_depth, self.depth)
        model = self.predictor.model
        key = (start, model.encoder_version())
        cached = key in self._slabs
        if cached:
            self._slabs.move_to_end(key)
        else:
            images = torch.cat([image_to_tensor(self.plane(j)) for j in range(start, start + self.slab_depth)])
            with torch.no_grad():
                encoding = model.encode(
                    images.to(self.predictor.device), run_encoder=self.predictor.encoder_runner(), slab_depth=self.slab_depth
                )  # fmt: skip
            embedding, height, width, extent = encoding
            key = (start, model.encoder_version())  # a first OpenVINO conversion bumps the versions once
            self._slabs[key] = [ImageEncoding(embedding[i : i + 1], height, width, extent) for i in range(self.slab_depth)]
            self.predictor.encoder_calls += self.slab_depth
            while len(self._slabs) > self.cache_slabs:
                self._slabs.popitem(last=False)
        return self._slabs[key][k - start], cached
