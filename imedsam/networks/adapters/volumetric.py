"""3DSAM-adapter's idea for a 2D encoder: a slab of neighbouring slices goes through the encoder as a batch, and
after every chosen block a depth-wise 3D convolution over (slice, row, column) of the token grid lets each token
see the same place on the slices around it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["VOLUMETRIC_BLOCKS", "VolumetricAdapter", "VolumetricAdapters", "add_volumetric_adapters", "check_slab_depth"]

#: which attention blocks carry an adapter: every one, or the second half (the blocks nearest the embedding)
VOLUMETRIC_BLOCKS = ("all", "last_half")


def check_slab_depth(batch: int, slab_depth: int) -> int:
    """The number of slabs in a batch of ``batch`` slices, or a clear error."""
    if isinstance(slab_depth, bool) or not isinstance(slab_depth, int) or slab_depth < 1:
        raise ValueError(f"slab_depth must be a positive number of slices, got {slab_depth!r}")
    if batch % slab_depth:
        raise ValueError(
            f"a batch of {batch} slices is not a whole number of slabs of {slab_depth}: give the encoder "
            f"[slabs * slab_depth, 3, S, S], each slab's slices consecutive and in order"
        )
    return batch // slab_depth


class VolumetricAdapter(nn.Module):
    """A bottleneck with a depth-wise 3D convolution, added to one block's output tokens.

    ``down`` projects each token to ``hidden_dim`` channels; a depth-wise ``kernel_size``³ convolution mixes
    each channel over the slab's slices and the token's neighbours in the grid; GELU; ``up`` projects back.
    ``up`` starts at zero, so that an untrained adapter adds nothing and the encoder is the 2D one exactly.
    A slab's first and last slices see zeros beyond them (the convolution's padding), as at a volume's ends.

    Args:
        dim: the block's token width.
        hidden_dim: the bottleneck's width.
        kernel_size: the convolution's side, odd, over slices, rows and columns alike.

    Shapes: ``tokens [N, h, w, dim]`` with ``N = slabs * slab_depth``, the slices of each slab consecutive ->
    the update ``[N, h, w, dim]``.

    Example::

        >>> adapter = VolumetricAdapter(64)
        >>> adapter(torch.rand(10, 8, 8, 64), slab_depth=5).abs().max().item()  # zero-initialised
        0.0
    """

    def __init__(self, dim: int, hidden_dim: int = 32, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.down = nn.Linear(dim, hidden_dim)
        self.mix = nn.Conv3d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, slab_depth: int) -> torch.Tensor:
        count, height, width, _ = tokens.shape
        slabs = check_slab_depth(count, slab_depth)
        hidden = self.down(tokens)
        channels = hidden.shape[-1]
        grid = hidden.view(slabs, slab_depth, height, width, channels).permute(0, 4, 1, 2, 3)
        grid = self.act(self.mix(grid))
        return self.up(grid.permute(0, 2, 3, 4, 1).reshape(count, height, width, channels))


class VolumetricAdapters(nn.Module):
    """One :class:`VolumetricAdapter` per chosen block of an encoder, and the slab depth the model was made for.

    Args:
        widths: every attention block's token width, in order.
        blocks: ``"all"`` or ``"last_half"`` (:data:`VOLUMETRIC_BLOCKS`): which blocks get an adapter.
        slab_depth: the slices a slab holds by default (training and whole-volume inference use it; a call may
            give another, ``1`` leaves the adapters no neighbours to see).
        hidden_dim, kernel_size: each adapter's (see :class:`VolumetricAdapter`).

    ``adapters[str(i)]`` is block ``i``'s adapter; ``adapters(i, tokens, slab_depth)`` adds block ``i``'s update.
    Tokens come as ``[N, L, C]`` (TinyViT, ``L`` a square grid) or ``[N, h, w, C]`` (SAM's ViT).

    Example::

        >>> adapters = VolumetricAdapters([128, 128, 160, 160], blocks="last_half", slab_depth=3)
        >>> sorted(adapters.adapters), adapters.slab_depth
        (['2', '3'], 3)
        >>> tokens = torch.rand(3, 16, 128)
        >>> adapters(0, tokens, 3) is tokens  # block 0 has no adapter
        True
    """

    def __init__(
        self, widths: Sequence[int], blocks: str = "all", slab_depth: int = 5, hidden_dim: int = 32, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if blocks not in VOLUMETRIC_BLOCKS:
            raise ValueError(f"volumetric_blocks must be one of {VOLUMETRIC_BLOCKS}, got {blocks!r}")
        check_slab_depth(slab_depth, slab_depth)
        first = 0 if blocks == "all" else len(widths) // 2
        self.blocks = blocks
        self.slab_depth = slab_depth
        self.adapters = nn.ModuleDict(
            {str(i): VolumetricAdapter(width, hidden_dim, kernel_size) for i, width in enumerate(widths) if i >= first}
        )

    def forward(self, block: int, tokens: torch.Tensor, slab_depth: int) -> torch.Tensor:
        """Block ``block``'s output ``tokens`` with its adapter's update added (shaped as they come), or as they
        are where the block has none."""
        if str(block) not in self.adapters:
            return tokens
        adapter = self.adapters[str(block)]
        if tokens.dim() == 4:
            return tokens + adapter(tokens, slab_depth)
        count, length, width = tokens.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"expected a square grid of tokens, got {length}")
        return tokens + adapter(tokens.view(count, side, side, width), slab_depth).view(count, length, width)

def add_volumetric_adapters(
    encoder: nn.Module, blocks: str = "all", slab_depth: int = 5, hidden_dim: int = 32, kernel_size: int = 3
) -> VolumetricAdapters:
    """Give ``encoder`` (an :class:`~imedsam.networks.encoders.AdaptedTinyViT` or
    :class:`~imedsam.networks.encoders.AdaptedImageEncoder`, whose ``block_widths`` list its blocks) its
    :class:`VolumetricAdapters`, trainable beside LoRA and the frequency adapters; returns them."""
    if getattr(encoder, "volumetric_adapters", None) is not None:
        raise ValueError("this encoder already has volumetric adapters")
    adapters = VolumetricAdapters(encoder.block_widths, blocks, slab_depth, hidden_dim, kernel_size)
    encoder.volumetric_adapters = adapters
    return adapters
