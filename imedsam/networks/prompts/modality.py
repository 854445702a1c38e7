"""The modality prompt (MCP-MedSAM): one learned token per imaging modality, and an "any" token for the rest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["ANY_MODALITY", "MODALITY_NAMES", "ModalityPrompt"]

#: the modalities of the CVPR 2024 "MedSAM on Laptop" challenge, which LiteMedSAM was trained on, in lower case
MODALITY_NAMES = ("ct", "mr", "pet", "us", "xray", "dermoscopy", "endoscopy", "fundus", "microscopy", "oct", "mammography")

#: the name of the "any" token, as None: for a modality not known where None cannot go (a batch does not collate it)
ANY_MODALITY = "any"


class ModalityPrompt(nn.Module):
    """A learned ``[dim]`` token for each of :data:`MODALITY_NAMES`, plus one "any" token for an image whose
    modality is not given or not among them.

    The "any" token is what the model falls back to, so it is trained too: in training each image's modality is
    replaced by "any" with probability ``dropout`` (as classifier-free guidance drops its condition). The module
    counts the images each token was trained on (``trained_images``, saved with the weights); outside training a
    modality whose token never trained gets the "any" token, so that a model fine-tuned without some modality
    meets it as it meets an image of no known modality, not with a random token.

    Shapes: :meth:`indices` gives ``[B]`` row numbers for ``B`` images; ``forward(indices)`` ``[B, dim]``.

    Example::

        >>> prompt = ModalityPrompt(dim=8)
        >>> prompt.indices(["ct", None, "endoscopy", "any"]).tolist()
        [0, 11, 6, 11]
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
        self.register_buffer("trained_images", torch.zeros(len(MODALITY_NAMES) + 1, dtype=torch.long))

    @property
    def any_index(self) -> int:
        """The row of the "any" token."""
        return len(MODALITY_NAMES)

    def indices(self, modalities: Sequence[str | None], device: torch.device | str | None = None) -> torch.Tensor:
        """Row numbers ``[B]`` for the images' modalities: a name of :data:`MODALITY_NAMES`, or None or
        :data:`ANY_MODALITY` (``"any"``) for the "any" token.

        Raises ``ValueError`` for any other string, listing the names, so that a typo is not read as "any"."""
        rows = []
        for modality in modalities:
            if modality is None or modality == ANY_MODALITY:
                rows.append(self.any_index)
            elif modality in MODALITY_NAMES:
                rows.append(MODALITY_NAMES.index(modality))
            else:
                raise ValueError(f"unknown modality {modality!r}: give one of {', '.join(MODALITY_NAMES)}, or None or {ANY_MODALITY!r} for any")
        return torch.tensor(rows, dtype=torch.long, device=device)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        any_rows = torch.full_like(indices, self.any_index)
        if self.training:
            if self.dropout > 0:
                indices = torch.where(torch.rand(indices.shape, device=indices.device) < self.dropout, any_rows, indices)
            self.trained_images += torch.bincount(indices, minlength=self.trained_images.numel())
        else:
            indices = torch.where(self.trained_images[indices] > 0, indices, any_rows)
        return self.tokens(indices)
