"""What I-MedSAM returns: the encoding of a batch of images, and the decoder's full output for its boxes."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["IMedSAMOutput", "ImageEncoding"]


class ImageEncoding(NamedTuple):
    """What the encoder computed for a batch of images; the boxes are not needed to compute it."""

    embedding: torch.Tensor  #: ``[B, 256, g, g]``
    height: int  #: height of the image the boxes refer to
    width: int  #: width of the image the boxes refer to
    #: ``(fy, fx)``: the part of the encoder's square input that the image fills (1, 1 unless letterboxed)
    extent: tuple[float, float] = (1.0, 1.0)


class IMedSAMOutput(NamedTuple):
    """Full decoder output, ``[B, N, H, W]`` each (``K`` refined points per box).

    With ``query_lines`` the maps cover only those rows and columns of the output grid: ``H x W`` is then
    the sub-lattice's size, and a loss reads its target at the same lines.
    """

    logits: torch.Tensor
    coarse_logits: torch.Tensor
    uncertainty: torch.Tensor | None  #: MC-dropout logit variance; None for ``use_inr=False``
    refined_index: torch.Tensor | None  #: ``[B, N, K]`` raster indices refined by the fine INR
    query_lines: tuple[torch.Tensor, torch.Tensor] | None = None  #: ``(rows, columns)`` decoded, None: all
    #: ``[B, 1, g, g]`` the box-proposal head's foreground logits over the encoder's input (training only)
    proposal_logits: torch.Tensor | None = None
