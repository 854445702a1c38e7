"""Low-rank adaptation of the query and value projections of SAM's attention blocks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LoRAQKV", "add_lora_to_attention"]


class LoRAQKV(nn.Module):
    """A frozen fused ``qkv`` projection plus trainable low-rank updates of q and v.

    ``qkv(x) + [scale * B_q A_q x, 0, scale * B_v A_v x]`` with ``scale = alpha / rank``. ``B`` starts at
    zero, so at initialisation the wrapped layer reproduces SAM exactly.

    Args:
        qkv: SAM's ``nn.Linear(dim, 3 * dim)``; it is kept as ``self.qkv`` and frozen.
        rank: rank of the update.
        alpha: scaling numerator; defaults to ``rank`` (scale 1, as in the official code).

    Shapes: input ``[..., dim]``, output ``[..., 3 * dim]``.

    Example::

        >>> layer = LoRAQKV(nn.Linear(8, 24), rank=2)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 24])
    """

    def __init__(self, qkv: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"expected a fused qkv projection dim -> 3*dim, got {qkv.in_features} -> {qkv.out_features}")
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        dim = qkv.in_features
        self.dim = dim
        self.scale = (rank if alpha is None else alpha) / rank
        self.q_down = nn.Linear(dim, rank, bias=False)
        self.q_up = nn.Linear(rank, dim, bias=False)
        self.v_down = nn.Linear(dim, rank, bias=False)
        self.v_up = nn.Linear(rank, dim, bias=False)
        for down, up in ((self.q_down, self.q_up), (self.v_down, self.v_up)):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        q = q + self.scale * self.q_up(self.q_down(x))
        v = v + self.scale * self.v_up(self.v_down(x))
        return torch.cat([q, k, v], dim=-1)


def add_lora_to_attention(blocks: nn.ModuleList, rank: int, alpha: float | None = None) -> None:
    """Replace ``attn.qkv`` of every SAM block by a :class:`LoRAQKV` wrapping it."""
    for block in blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank=rank, alpha=alpha)
