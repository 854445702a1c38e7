"""The content prompt: a token that says what the image holds inside the box."""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.ops import roi_align

__all__ = ["ContentPrompt"]


class ContentPrompt(nn.Module):
    """The image embedding inside each box, pooled onto a ``grid x grid`` lattice, through a small MLP.

    MCP-MedSAM's content prompt runs a CNN on a crop of the raw image and a frozen CLIP on it; this one reads
    the embedding the encoder has already made, so it costs one ROI-align and two matmuls per prompt.

    Shapes: ``image_embeddings [P, C, g, g]`` (one row per prompt), ``boxes [P, 4]`` x0, y0, x1, y1 in pixels of
    the encoder's ``image_size`` input; output ``[P, dim]``.

    Example::

        >>> prompt = ContentPrompt(channels=16, dim=8, image_size=64)
        >>> prompt(torch.randn(3, 16, 4, 4), torch.tensor([[0.0, 0, 32, 32]] * 3)).shape
        torch.Size([3, 8])
    """

    def __init__(self, channels: int = 256, dim: int = 256, image_size: int = 256, grid: int = 2) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid = grid
        self.mlp = nn.Sequential(nn.Linear(channels * grid * grid, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype).unsqueeze(1)
        scale = image_embeddings.shape[-1] / self.image_size
        pooled = roi_align(
            image_embeddings.float(), torch.cat([rows, boxes.float()], dim=1), self.grid, scale, sampling_ratio=2, aligned=True
        )  # fmt: skip
        return self.mlp(pooled.flatten(1).to(image_embeddings.dtype))
