"""The Frequency Adapter: a Fourier view of the image that steers the frozen ViT through small adapters."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["FA_MODES", "frequency_image", "FrequencyAdapter", "frequency_adapters"]

FA_MODES = ("amplitude", "phase", "none")


def frequency_image(image: torch.Tensor, mode: str = "amplitude") -> torch.Tensor:
    """Per-image centred Fourier map of the grey image, scaled to [0, 1].

    Args:
        image: ``[B, 3, H, W]`` RGB in [0, 1].
        mode: ``"amplitude"`` (log-magnitude, min-max normalised per image) or ``"phase"``
            (angle mapped from [-pi, pi] to [0, 1]).

    Returns:
        ``[B, 3, H, W]``: the map repeated on three channels so SAM's patch embedding can take it.

    The grey image is the mean of R, G and B (the official code read the R channel three times) and the
    amplitude is log-scaled: a linear magnitude is all DC peak, so almost no token would carry signal.
    """
    if mode not in ("amplitude", "phase"):
        raise ValueError(f"frequency_image mode must be 'amplitude' or 'phase', got {mode!r}")
    grey = image.float().mean(dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1))
    if mode == "amplitude":
        amplitude = torch.log1p(spectrum.abs())
        low = amplitude.amin(dim=(-2, -1), keepdim=True)
        high = amplitude.amax(dim=(-2, -1), keepdim=True)
        out = (amplitude - low) / (high - low).clamp_min(1e-6)
    else:
        out = (torch.angle(spectrum) + math.pi) / (2 * math.pi)
    return out.unsqueeze(1).expand(-1, 3, -1, -1).to(image.dtype)


class FrequencyAdapter(nn.Module):
    """Bottleneck adapter on the frequency token stream of one ViT block.

    ``delta = up(GELU(down(LayerNorm(f))))``; the caller adds ``delta`` both to the block output and to the
    frequency stream, so the stream is chained from block to block as in the paper's figure. ``up`` starts
    at zero, so the adapted encoder equals SAM at initialisation.

    Shapes: input ``[B, h, w, dim]`` tokens, output the same.

    Example::

        >>> FrequencyAdapter(dim=16, hidden_dim=4)(torch.randn(1, 3, 3, 16)).abs().max().item()
        0.0
    """

    def __init__(self, dim: int, hidden_dim: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(tokens))))


def frequency_adapters(widths: list[int], fa_mode: str, hidden_dim: int = 4) -> nn.ModuleList:
    """One :class:`FrequencyAdapter` per block of the given token widths; none for ``fa_mode="none"``."""
    if fa_mode not in FA_MODES:
        raise ValueError(f"fa_mode must be one of {FA_MODES}, got {fa_mode!r}")
    return nn.ModuleList([FrequencyAdapter(width, hidden_dim) for width in widths] if fa_mode != "none" else [])
