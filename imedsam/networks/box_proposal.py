"""Box proposal from the image embedding alone: where is the object when nobody has drawn a box?

Self-prompting in the spirit of ESP-MedSAM: a small head reads the image embedding and predicts a coarse
foreground map; the proposed box is the bounding box of its most confident connected region. The head is
trained on the embedding with gradients stopped, so it never changes what the encoder learns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["BoxProposalHead", "BoxProposal", "boxes_from_foreground"]


class BoxProposal(NamedTuple):
    """Proposed boxes ``[B, 4]`` (x0, y0, x1, y1 in image pixels) and their confidence ``[B]`` in [0, 1]:
    the highest foreground probability inside the box."""

    boxes: torch.Tensor
    confidence: torch.Tensor


class BoxProposalHead(nn.Module):
    """Coarse foreground logits from an image embedding, for proposing a box.

    Two 3 x 3 convolutions with GroupNorm and GELU, then a 1 x 1 convolution to one channel. About 0.2 M
    parameters for a 256-channel embedding. ``trained_steps`` counts the training passes the head has been
    through (it is saved with the state dict), so that an untrained head is refused rather than used.

    Args:
        in_channels: channels of the embedding (256 for SAM and LiteMedSAM).
        hidden_channels: width of the two hidden convolutions.

    Shapes: ``embedding [B, C, g, g]`` -> logits ``[B, 1, g, g]``.

    Example::

        >>> head = BoxProposalHead(256)
        >>> head(torch.zeros(2, 256, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, in_channels: int, hidden_channels: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.GroupNorm(8, hidden_channels),
            nn.GELU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.GroupNorm(8, hidden_channels),
            nn.GELU(),
            nn.Conv2d(hidden_channels, 1, 1),
        )
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def is_trained(self) -> bool:
        return int(self.trained_steps) > 0

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.trained_steps += 1
        return self.layers(embedding)


def boxes_from_foreground(
    logits: torch.Tensor, extent: tuple[float, float], height: int, width: int, upsample: int = 4
) -> BoxProposal:
    """The box of the most confident foreground region of each coarse map.

    Args:
        logits: ``[B, 1, g, g]`` from :class:`BoxProposalHead`, covering the encoder's square input.
        extent: ``(fy, fx)``, the part of that square the image fills (letterboxing); the rest is ignored.
        height, width: the image's size; the boxes are returned in its pixels.
        upsample: the map is bilinearly upsampled by this factor first, so box edges fall between cells.

    The region is the 8-connected component, of the pixels at or above ``min(0.5, peak / 2)``, with the
    largest summed probability. A map whose peak is under 0.5 still yields a box (around its most likely
    region); its low ``confidence`` says so.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be [B, 1, g, g], got {tuple(logits.shape)}")
    side = logits.shape[-1] * upsample
    probability = torch.sigmoid(F.interpolate(logits.float(), size=(side, side), mode="bilinear", align_corners=False))
    rows, cols = max(1, round(side * extent[0])), max(1, round(side * extent[1]))
    probability = probability[:, 0, :rows, :cols].detach().cpu().numpy()
    boxes, confidence = [], []
    for plane in probability:
        peak = float(plane.max())
        components, count = ndimage.label(plane >= min(0.5, peak / 2), structure=np.ones((3, 3)))
        mass = ndimage.sum_labels(plane, components, index=np.arange(1, count + 1))
        region = components == 1 + int(np.argmax(mass))
        ys, xs = np.nonzero(region)
        # pixel edges of the region, from the map's pixels to the image's
        boxes.append([xs.min() / cols * width, ys.min() / rows * height, (xs.max() + 1) / cols * width, (ys.max() + 1) / rows * height])
        confidence.append(float(plane[region].max()))
    return BoxProposal(torch.tensor(boxes, dtype=torch.float32), torch.tensor(confidence, dtype=torch.float32))
