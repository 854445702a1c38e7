"""Uncertainty-guided sampling's second stage: the fine INR at the points the coarse INR is least sure of.

The fine INR's input at a point is the coarse INR's input there plus the coarse head's features; its logit
(plus SAM's mask logit, with a mask prior) replaces the coarse one. The exact mode refines the top-K points of
the whole grid, the adaptive mode those of its last level (:mod:`~imedsam.networks.implicit.adaptive`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .first_layer_table import sample_mask_prior, table_taps
from .heads import coarse_features, coarse_features_to_fine, fine_logit
from .plan import DecodePlan

__all__ = ["refine"]


def refine(
    decoder: nn.Module, plan: DecodePlan, box_features, image_features, index, class_ids, coarse_table, kept_trunk,
    kept_positions: torch.Tensor | str | None = None,
):  # fmt: skip
    """Fine logits ``[P, K]`` at raster ``index [P, K]`` of the query grid of ``coarse_table``, from ``decoder``,
    an :class:`~imedsam.networks.implicit.decoder.ImplicitSegmentationDecoder` (its tables, trunks and heads).

    The coarse trunk there is taken from ``kept_trunk`` (rows at ``kept_positions``, by default the
    raster indices themselves; ``"in order"``: its rows are those of ``index``, in order) or recomputed
    when nothing was kept.
    """
    if kept_positions is None:
        kept_positions = index
    fine_table = decoder.first_layer_table(
        decoder.fine_input, decoder.fine_trunk, plan, box_features, image_features, coarse_table.ys, coarse_table.xs,
        coarse_table.pixel_grid, coarse_table.extent, points=index.shape[1],
    )  # fmt: skip
    feature_w = decoder.fine_input.weight[:, decoder.point_dim :]
    if not plan.training:
        feature_w = feature_w * decoder.fine_trunk.input_fold()[0].unsqueeze(-1)
    run_coarse = decoder.trunk_runner(decoder.coarse_trunk, plan)
    run_fine = decoder.trunk_runner(decoder.fine_trunk, plan)
    step = index.shape[1] if (kept_trunk is not None or plan.chunk_points is None) else plan.chunk_points
    fine_logits = []
    for start in range(0, index.shape[1], step):
        part = index[:, start : start + step]
        if kept_trunk is not None and isinstance(kept_positions, str):
            trunk = kept_trunk  # one chunk whenever something was kept (``step`` above)
        elif kept_trunk is not None:
            rows = kept_positions[:, start : start + step]
            trunk = kept_trunk.gather(1, rows.unsqueeze(-1).expand(-1, -1, kept_trunk.shape[-1]))
        else:
            trunk = run_coarse(decoder.first_layer(coarse_table, part)[0])
        if plan.training:
            assignment = plan.dropout.assignment.gather(1, part)
            from_coarse = F.linear(coarse_features(decoder.coarse_heads, plan, trunk, class_ids, assignment), feature_w)
        else:
            from_coarse = coarse_features_to_fine(decoder.coarse_heads, trunk, class_ids, feature_w)
        first, prior = decoder.first_layer(fine_table, part)
        hidden = run_fine(first + from_coarse.to(fine_table.values.dtype)).float()
        logit = fine_logit(decoder.fine_heads, hidden, class_ids)
        if coarse_table.mask_prior is not None:
            logit = logit + sample_mask_prior(coarse_table, *table_taps(coarse_table, part))[..., 0]
        fine_logits.append(logit)
    return torch.cat(fine_logits, dim=1)
