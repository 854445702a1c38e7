"""0.5 BCE + 0.5 Dice on the coarse and the final logits, with a coarse weight that decays over training."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = ["DiceBCELoss", "CoarseFineLoss", "coarse_weight_at"]


def coarse_weight_at(epoch: int, start: float = 0.8, end: float = 0.0, decay_epochs: int = 4) -> float:
    """Weight of the coarse loss at 0-based ``epoch``: linear from ``start`` to ``end`` over ``decay_epochs``.

    The defaults reproduce the official schedule, 0.8, 0.6, 0.4, 0.2, then 0 from epoch 4; the coarse
    branch keeps learning afterwards through the unrefined points of the final map.
    """
    if decay_epochs <= 0:
        return end
    fraction = min(max(epoch, 0) / decay_epochs, 1.0)
    return start + (end - start) * fraction


class DiceBCELoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * soft Dice`` on logits ``[B, N, H, W]`` and binary targets.

    This is the paper's 0.5 CE + 0.5 Dice; it is written out rather than taken from ``DiceCELoss``, whose
    CE term changed meaning for one channel between MONAI versions.
    """

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
        target = target.to(logits.dtype)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


class CoarseFineLoss(nn.Module):
    """``w * L(coarse) + (1 - w) * L(final) + p * L(proposal)`` with ``L`` = :class:`DiceBCELoss`.

    ``coarse_weight`` is an attribute so that a training handler can follow :func:`coarse_weight_at`.
    The prediction is an :class:`~imedsam.networks.IMedSAMOutput` or a mapping with ``logits`` and
    ``coarse_logits``; a plain tensor is treated as both (the ``use_inr=False`` ablation). When the
    prediction covers only a sub-lattice of the output grid (its ``query_lines``), the full-resolution
    target is read at those rows and columns.

    When the prediction carries ``proposal_logits`` (the box-proposal head's coarse map over the encoder's
    square input, in training), they are upsampled to the target's grid and scored against the union of
    the image's targets, with weight ``proposal_weight``. The head sees the embedding with gradients
    stopped, so this term trains the head alone.
    """

    def __init__(
        self, coarse_weight: float = 0.8, dice_weight: float = 0.5, bce_weight: float = 0.5, proposal_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.coarse_weight = coarse_weight
        self.proposal_weight = proposal_weight
        self.loss = DiceBCELoss(dice_weight, bce_weight)

    def forward(self, prediction, target: torch.Tensor) -> torch.Tensor:
        if isinstance(prediction, torch.Tensor):
            return self.loss(prediction, target)
        if isinstance(prediction, Mapping):
            final, coarse, lines = prediction["logits"], prediction["coarse_logits"], prediction.get("query_lines")
            proposal = prediction.get("proposal_logits")
        else:
            final, coarse, lines = prediction.logits, prediction.coarse_logits, prediction.query_lines
            proposal = getattr(prediction, "proposal_logits", None)
        loss = final.new_zeros(())
        if proposal is not None and self.proposal_weight:
            foreground = target.amax(dim=1, keepdim=True)
            upsampled = F.interpolate(proposal, size=foreground.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + self.proposal_weight * self.loss(upsampled, foreground)
        if lines is not None:
            target = self.target_at(target, lines)
        loss = loss + (1.0 - self.coarse_weight) * self.loss(final, target)
        if self.coarse_weight:
            loss = loss + self.coarse_weight * self.loss(coarse, target)
        return loss

    @staticmethod
    def target_at(target: torch.Tensor, query_lines) -> torch.Tensor:
        """``target [..., H, W]`` at the rows and columns ``query_lines`` of the output grid."""
        rows, columns = (torch.as_tensor(lines, device=target.device).long() for lines in query_lines)
        height, width = target.shape[-2:]
        if rows.max() >= height or columns.max() >= width:
            raise ValueError(
                f"the prediction was decoded at rows up to {int(rows.max())} and columns up to {int(columns.max())}, "
                f"outside the {height} x {width} target: the target must be at the full output size"
            )
        return target.index_select(-2, rows).index_select(-1, columns)
