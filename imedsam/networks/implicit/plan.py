"""What one call of the implicit decoder returns, and the plan it follows."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DecodePlan", "DropoutDraw", "ImplicitDecoderOutput"]


class ImplicitDecoderOutput(NamedTuple):
    """Per-prompt decoder outputs on an ``H x W`` query grid (``P`` prompts, ``K`` refined points each).

    The query grid is the output grid, or the sub-lattice of its rows and columns given as ``query_lines``.
    """

    logits: torch.Tensor  #: ``[P, H, W]`` coarse logits with the refined points replaced by fine logits
    coarse_logits: torch.Tensor  #: ``[P, H, W]``
    uncertainty: torch.Tensor  #: ``[P, H, W]`` MC-dropout variance (of the logit; of the probability with a mask prior)
    refined_index: torch.Tensor | None  #: ``[P, K]`` raster indices refined by the fine INR, None when UGS is off


class DropoutDraw(NamedTuple):
    """Every dropout mask of one call (inverted dropout: kept channels are scaled by ``1 / (1 - p)``)."""

    #: ``[M, width]`` masks of the coarse trunk's output, and ``[P, N]`` the one each query point uses for
    #: its logit and for the features it hands to the fine INR; both None at inference, where dropout is off
    pool: torch.Tensor | None
    assignment: torch.Tensor | None
    #: ``[T, width]`` masks of the T MC passes that give the uncertainty
    passes: torch.Tensor
    #: ``[T, box_channels]`` masks of SAM's mask-head channels in the same passes (with a mask prior)
    prior_passes: torch.Tensor | None


class DecodePlan(NamedTuple):
    """How one call decodes: every choice that training and inference make differently, made once."""

    #: training: BatchNorm with batch statistics (so all points at once and no folding), fresh dropout
    training: bool
    #: ``"exact"`` (every query point) or ``"adaptive"`` (the boundary, level by level; inference only)
    mode: str
    #: dtype of the trunks' matmuls (bfloat16 only at inference)
    dtype: torch.dtype
    #: query points per prompt in one chunk; None: all at once
    chunk_points: int | None
    dropout: DropoutDraw
