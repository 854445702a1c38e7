"""The modality prompt (MCP-MedSAM): one learned token per imaging modality, and an "any" token for the rest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...data.modalities import MODALITIES

__all__ = ["MODALITY_NAMES", "ModalityPrompt"]

#: the modalities of the CVPR 2024 "MedSAM on Laptop" challenge, which LiteMedSAM was trained on, in lower case
MODALITY_NAMES = MODALITIES


class ModalityPrompt(nn.Module):
    """A learned ``[dim]`` token for each of :data:`MODALITY_NAMES`, plus one "any" token for an image whose
    modality is not given or not among them.

    The "any" token is what the model falls back to, so it is trained too: in training each image's modality is
    replaced by "any" with probability ``dropout`` (as classifier-free guidance drops its condition).

    Shapes: :meth:`indices` gives ``[B]`` row numbers for ``B`` images; ``forward(indices)`` ``[B, dim]``.

    Example::

        >>> prompt = ModalityPrompt(dim=8)
        >>> prompt.indices(["ct", None, "endoscopy"]).tolist()
        [0, 11, 6]
        >>> prompt(prompt.indices(["ct", "mr"])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.tokens = nn.Embedding(len(MODALITY_NAMES) + 1, dim)
        nn.init.normal_(self.tokens.weight, std=1.0)  # SAM's prompt tokens are of this scale

    @property
    def any_index(self) -> int:
        """The row of the "any" token."""
        return len(MODALITY_NAMES)

    def indices(self, modalities: Sequence[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """Row numbers ``[B]`` for the images' modalities: a name of :data:`MODALITY_NAMES`, or None for "any".

        Raises ``ValueError`` for any other string, listing the names, so that a typo is not read as "any"."""
        rows = []
        for modality in modalities:
            if modality is None:
                rows.append(self.any_index)
            elif modality in MODALITY_NAMES:
                rows.append(MODALITY_NAMES.index(modality))
            else:
                raise ValueError(f"unknown modality {modality!r}: give one of {', '.join(MODALITY_NAMES)}, or None for any")
        return torch.tensor(rows, dtype=torch.long, device=device)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            dropped = torch.rand(indices.shape, device=indices.device) < self.dropout
            indices = torch.where(dropped, torch.full_like(indices, self.any_index), indices)
        return self.tokens(indices)
