"""Low-rank adaptation of SAM's two-way transformer, where prompt tokens and image tokens meet."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention, TwoWayTransformer

__all__ = ["DecoderLoRA", "LinearWithUpdate", "LowRankUpdate"]


class LowRankUpdate(nn.Module):
    """``scale * B A x``: ``A`` ``[rank, in]`` Kaiming-initialised, ``B`` ``[out, rank]`` zero, so that it adds
    nothing until trained. Shapes: ``[..., in] -> [..., out]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class LinearWithUpdate(nn.Linear):
    """A frozen ``nn.Linear`` plus a :class:`LowRankUpdate` that lives elsewhere (:class:`DecoderLoRA`).

    The layer keeps the wrapped layer's own ``weight`` and ``bias`` under their names, so SAM's and LiteMedSAM's
    checkpoints load into it unchanged; the update is referenced, not registered, so that it is saved once, under
    the :class:`DecoderLoRA` that owns it.
    """

    def __init__(self, linear: nn.Linear, update: LowRankUpdate) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        object.__setattr__(self, "update", update)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.update(x)


class DecoderLoRA(nn.Module):
    """LoRA on the query and value projections of every attention of SAM's two-way transformer (the mask
    decoder's), the one part of the prompt path where a prompt token and the image meet.

    LiteMedSAM's transformer was trained with box prompts only: with it frozen, a click's embedding has nothing
    that learned to read it, and a click-trained model marks a small blob around the click (``docs/results.md``,
    "Clicks"). These updates let the transformer learn clicks while its pretrained weights stay as they are; they
    start at zero, so the model is unchanged until trained.

    Args:
        transformer: the mask decoder's :class:`~segment_anything.modeling.transformer.TwoWayTransformer`; its
            attentions' ``q_proj`` and ``v_proj`` are replaced in place by :class:`LinearWithUpdate`.
        rank: the updates' rank.
        alpha: scaling numerator (default ``rank``: scale 1).

    Example::

        >>> from imedsam.networks.presets import build_sam_parts
        >>> _, _, mask_decoder = build_sam_parts("vit_tiny", 64)
        >>> lora = DecoderLoRA(mask_decoder.transformer, rank=2)
        >>> len(lora.updates), sum(p.numel() for p in lora.parameters())
        (14, 11776)
    """

    def __init__(self, transformer: TwoWayTransformer, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"decoder LoRA rank must be positive, got {rank}")
        scale = (rank if alpha is None else alpha) / rank
        self.updates = nn.ModuleDict()
        for name, attention in transformer.named_modules():
            if not isinstance(attention, Attention):
                continue
            for projection in ("q_proj", "v_proj"):
                linear = getattr(attention, projection)
                if isinstance(linear, LinearWithUpdate):
                    raise ValueError(f"{name}.{projection} already has a low-rank update")
                update = LowRankUpdate(linear.in_features, linear.out_features, rank, scale)
                self.updates[f"{name.replace('.', '_')}_{projection}"] = update
                setattr(attention, projection, LinearWithUpdate(linear, update))
        if not self.updates:
            raise ValueError("the transformer has no SAM Attention to adapt")
