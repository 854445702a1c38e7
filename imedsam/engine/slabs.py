"""A batch of slabs (:class:`~imedsam.transforms.LoadSlabd`) as the network takes it: the slices of each slab as
consecutive images, with a box each, and the slab depth for the encoder's volumetric adapters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor

from .prompt_batch import PreparePromptBatch

__all__ = ["PrepareSlabBatch"]


class PrepareSlabBatch(PreparePromptBatch):
    """``prepare_batch`` for a trainer or evaluator over slabs of ``D`` slices.

    The batch holds ``image [B, 3 * D, H, W]``, ``label [B, D, h, w]``, ``box [B, D, 4]`` (one box per slice,
    :class:`~imedsam.transforms.BoxFromMaskd` on the slab's label) and optionally ``modality`` (one per slab).
    They become ``image [B * D, 3, H, W]``, ``label [B * D, 1, h, w]``, ``boxes [B * D, 1, 4]`` and a modality per
    slice, with ``slab_depth=D`` for :class:`~imedsam.engine.PromptInferer`, which passes it to the network.
    The slices of a slab stay consecutive, as :meth:`~imedsam.networks.IMedSAM.encode` needs them.

    Args:
        slab_depth: ``D``; a batch whose channels do not match it is an error.
        encoder_slab_depth: the slab depth the network's encoder is given, a divisor of ``D`` (default ``D``): 1
            lets volumetric adapters see no neighbours on the same data (an ablation).
        extra_keys: as :class:`~imedsam.engine.PreparePromptBatch`'s, whose keys a batch lacks are left out
            (default: ``boxes`` from ``box``, ``modality`` from ``modality``, and the clicks ``points`` and
            ``point_labels``).
    """

    def __init__(self, slab_depth: int, encoder_slab_depth: int | None = None, extra_keys: Mapping[str, str] | None = None) -> None:
        super().__init__(extra_keys or {"boxes": "box", "modality": "modality", "points": "points", "point_labels": "point_labels"})
        self.slab_depth = int(slab_depth)
        self.encoder_slab_depth = self.slab_depth if encoder_slab_depth is None else int(encoder_slab_depth)
        if self.slab_depth < 1 or self.encoder_slab_depth < 1 or self.slab_depth % self.encoder_slab_depth:
            raise ValueError(
                f"encoder_slab_depth ({self.encoder_slab_depth}) must divide the data's slab depth ({self.slab_depth})"
            )

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        depth = self.slab_depth
        image, label, args, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        slabs, channels = image.shape[:2]
        if channels != 3 * depth or label.shape[1] != depth:
            raise ValueError(
                f"a slab of {depth} slices has image [B, {3 * depth}, H, W] and label [B, {depth}, h, w]; got "
                f"{tuple(image.shape)} and {tuple(label.shape)}: is slab_depth the datalist's?"
            )
        # plain tensors: a batch's per-item metadata no longer lines up once each item is D images
        image = _plain(image).reshape(slabs * depth, 3, *image.shape[-2:])
        label = _plain(label).reshape(slabs * depth, 1, *label.shape[-2:])
        if "boxes" in extra:
            extra["boxes"] = _plain(extra["boxes"]).reshape(slabs * depth, 1, 4)
        if "points" in extra:  # [B, D, K, 2] clicks per slice (ClicksFromMaskd) -> one prompt of K clicks per slice
            extra["points"] = _plain(extra["points"]).reshape(slabs * depth, 1, -1, 2)
            extra["point_labels"] = _plain(extra["point_labels"]).reshape(slabs * depth, 1, -1)
        if "modality" in extra:
            extra["modality"] = _per_slice(extra["modality"], depth)
        return image, label, args, {**extra, "slab_depth": self.encoder_slab_depth}


def _per_slice(modalities: Sequence[str], depth: int) -> list[str]:
    return [name for name in modalities for _ in range(depth)]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor
