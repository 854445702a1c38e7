"""Low-rank adaptation of the query and value projections of SAM's attention blocks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LoRAQKV", "add_lora_to_attention", "qkv_rows"]


def qkv_rows(dim: int, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows of a fused ``qkv`` layer that hold q and v, ``[dim]`` each.

    SAM stacks the three projections, ``[q | k | v]``. TinyViT (LiteMedSAM's encoder) views the output as
    ``[heads, 3 * head_dim]`` and splits each head's slice into q, k and v, so its rows are interleaved per
    head: pass its ``head_dim``.
    """
    if head_dim is None:
        return torch.arange(dim), torch.arange(2 * dim, 3 * dim)
    if dim % head_dim:
        raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
    head_start = torch.arange(dim // head_dim).unsqueeze(1) * 3 * head_dim
    within = torch.arange(head_dim)
    return (head_start + within).flatten(), (head_start + 2 * head_dim + within).flatten()


class LoRAQKV(nn.Module):
    """A frozen fused ``qkv`` projection plus trainable low-rank updates of q and v.

    ``qkv(x) + scale * B_q A_q x`` on the q rows and ``+ scale * B_v A_v x`` on the v rows, with
    ``scale = alpha / rank``; the k rows are untouched. ``B`` starts at zero, so at initialisation the
    wrapped layer reproduces the pretrained one exactly.

    Args:
        qkv: the fused ``nn.Linear(dim, 3 * dim)``; it is kept as ``self.qkv`` and frozen.
        rank: rank of the update.
        alpha: scaling numerator; defaults to ``rank`` (scale 1, as in the official code).
        head_dim: None for SAM's ``[q | k | v]`` layout; the head width for TinyViT's per-head
            interleaved layout (see :func:`qkv_rows`).

    Shapes: input ``[..., dim]``, output ``[..., 3 * dim]``.

    Example::

        >>> layer = LoRAQKV(nn.Linear(8, 24), rank=2)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 24])
    """

    def __init__(self, qkv: nn.Linear, rank: int = 4, alpha: float | None = None, head_dim: int | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"expected a fused qkv projection dim -> 3*dim, got {qkv.in_features} -> {qkv.out_features}")
        self.qkv = qkv
        self.qkv.requires_grad_(False)
        dim = qkv.in_features
        self.scale = (rank if alpha is None else alpha) / rank
        self.q_down = nn.Linear(dim, rank, bias=False)
        self.q_up = nn.Linear(rank, dim, bias=False)
        self.v_down = nn.Linear(dim, rank, bias=False)
        self.v_up = nn.Linear(rank, dim, bias=False)
        for down, up in ((self.q_down, self.q_up), (self.v_down, self.v_up)):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        self.interleaved = head_dim is not None
        q_rows, v_rows = qkv_rows(dim, head_dim)
        # for each output row of qkv, its row in [q_up; v_up; a zero row] (k rows take the zero row)
        source = torch.full((qkv.out_features,), 2 * dim, dtype=torch.long)
        source[q_rows], source[v_rows] = torch.arange(dim), dim + torch.arange(dim)
        self.register_buffer("update_source_rows", source, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.cat([self.q_down(x), self.v_down(x)], dim=-1)  # [..., 2 * rank]
        # both ups as one [3 * dim, 2 * rank] matrix whose k rows are zero: the update is then one small
        # matmul accumulated into qkv's output, with no scatter of it into the q and v columns, whose backward
        # (a gather along the last dimension) cost more than the update itself
        rank = self.q_up.in_features
        q_up, v_up = F.pad(self.q_up.weight, (0, rank)), F.pad(self.v_up.weight, (rank, 0))
        ups = torch.cat([q_up, v_up, q_up.new_zeros(1, 2 * rank)]).index_select(0, self.update_source_rows)
        out = self.qkv(x)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), ups.t(), alpha=self.scale).view(out.shape)


def add_lora_to_attention(blocks, rank: int, alpha: float | None = None, head_dim: int | None = None) -> None:
    """Replace ``attn.qkv`` of every block by a :class:`LoRAQKV` wrapping it (``head_dim`` as there)."""
    for block in blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank=rank, alpha=alpha, head_dim=head_dim)
