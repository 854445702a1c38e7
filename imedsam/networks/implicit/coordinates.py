"""Query coordinates of the implicit decoder: pixel centres, sampled lines, Fourier encoding, bilinear taps."""

from __future__ import annotations

import math

import torch

__all__ = [
    "pixel_centres",
    "stratified_lines",
    "fourier_encoding",
    "fourier_encoding_dim",
    "bilinear_taps",
]


def pixel_centres(size: int, device: torch.device | None = None) -> torch.Tensor:
    """Normalised coordinates ``[size]`` of the pixel centres along one axis of ``size`` pixels, in (-1, 1)
    with the ``align_corners=False`` convention: pixel ``i`` is at ``(2 i + 1) / size - 1``."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def stratified_lines(
    size: int, count: int, device: torch.device | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` of the ``size`` rows (or columns) of a grid, one drawn uniformly from each of ``count``
    consecutive, near-equal strata: increasing indices ``[count]``.

    Every line has a chance of ``count / size`` and no gap between two drawn lines exceeds two strata, so
    a sub-lattice of such rows and columns covers the whole image at every step, at full resolution.
    """
    if not 1 <= count <= size:
        raise ValueError(f"cannot draw {count} of {size} lines: the count must be between 1 and the grid size")
    edges = torch.div(torch.arange(count + 1, device=device) * size, count, rounding_mode="floor")
    widths = edges[1:] - edges[:-1]
    offsets = (torch.rand(count, device=device, generator=generator) * widths).long()
    return edges[:-1] + torch.minimum(offsets, widths - 1)  # a float product may round up to the width


def fourier_encoding_dim(num_frequencies: int, coord_dim: int = 2) -> int:
    return coord_dim * (2 * num_frequencies + 1)


def fourier_encoding(coords: torch.Tensor, num_frequencies: int = 10) -> torch.Tensor:
    """The paper's gamma(p): ``[sin(2^k pi p), cos(2^k pi p)]`` for k = 0..L-1, followed by p itself.

    ``coords [..., 2]`` -> ``[..., 2 * (2L + 1)]`` (42 for L = 10).
    """
    freqs = (2.0 ** torch.arange(num_frequencies, device=coords.device, dtype=coords.dtype)) * math.pi
    angles = (coords.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([torch.sin(angles), torch.cos(angles), coords], dim=-1)


def bilinear_taps(height: int, width: int, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four raster rows of an ``height x width`` map that bilinear sampling at ``coords [..., 2]`` blends,
    and their weights (``[..., 4]`` each), with ``align_corners=False`` and border clamping."""
    h, w = height, width
    x = (((coords[..., 0] + 1) * w - 1) / 2).clamp(0, w - 1)
    y = (((coords[..., 1] + 1) * h - 1) / 2).clamp(0, h - 1)
    x0 = x.floor().clamp(max=max(w - 2, 0))
    y0 = y.floor().clamp(max=max(h - 2, 0))
    fx = x - x0
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    rows = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=-1)
    weights = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], dim=-1)
    return rows, weights
