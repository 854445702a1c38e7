"""The implicit decoder's adaptive mode: coarse to fine, evaluating only near the predicted boundary.

The coarse INR runs on a grid ``2**levels`` times coarser than the output (at most ``adaptive_coarse_size`` on
a side). At each finer level the logits and variances are bilinear from the level below, and the coarse INR
is evaluated again only at the points nearest the predicted boundary (smallest ``|logit|``): ``adaptive_points``
at the output's level and half as many at each level below it, since a boundary's length in pixels halves
with the grid's side while the band around it that interpolation may get wrong stays a pixel or two wide.
The fine INR re-predicts the points of the last level. The cost grows with the boundary's length, not with
the output's area, and where it evaluates it is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .coordinates import pixel_centres
from .fine import refine
from .plan import DecodePlan, ImplicitDecoderOutput

__all__ = ["adaptive_levels", "decode_adaptive", "level_points"]


def adaptive_levels(output_size: tuple[int, int], coarse_size: int) -> int:
    """How many times the first grid is halved below ``output_size`` to fit ``coarse_size``; 0: decode exactly."""
    return max(0, math.ceil(math.log2(max(output_size) / coarse_size)))


def level_points(output_points: int, levels: int, level: int) -> int:
    """Points evaluated at ``level`` (1..``levels``) when the output's level evaluates ``output_points``."""
    return max(1, output_points >> (levels - level))


def _level_size(output_size: tuple[int, int], levels: int, level: int) -> tuple[int, int]:
    factor = 2 ** (levels - level)
    return math.ceil(output_size[0] / factor), math.ceil(output_size[1] / factor)


def decode_adaptive(
    decoder: torch.nn.Module,
    plan: DecodePlan,
    box_features: torch.Tensor,
    image_features: torch.Tensor,
    output_size: tuple[int, int],
    class_ids: torch.Tensor,
    levels: int,
    extent: tuple[float, float] = (1.0, 1.0),
    prior: torch.Tensor | None = None,
) -> ImplicitDecoderOutput:
    """Decode ``output_size`` in ``levels + 1`` levels (see the module) with ``decoder``, an
    :class:`~imedsam.networks.implicit.decoder.ImplicitSegmentationDecoder` (its tables, coarse and fine INRs);
    shapes as its ``forward``."""
    prompts = box_features.shape[0]

    def level_table(size: tuple[int, int], points: int, image_rows: torch.Tensor | None = None):
        ys, xs = (pixel_centres(n, box_features.device) for n in size)
        return decoder.first_layer_table(
            decoder.coarse_input, decoder.coarse_trunk, plan, box_features, image_features, ys, xs, True, extent, prior,
            points, image_rows,
        )  # fmt: skip

    size = _level_size(output_size, levels, 0)
    first_table = level_table(size, size[0] * size[1])
    # every level's table has the same image-map rows: computed once, then held as they are by a later level's table
    # that keeps the box map (SAM's 256 x 256 one, at these point counts) or copied into one that tabulates it
    image_rows = first_table.image_rows
    coarse, variance, _ = decoder.coarse_at(plan, first_table, None, class_ids, keep_trunk=False)
    for level in range(1, levels + 1):
        previous, size = size, _level_size(output_size, levels, level)
        coarse, variance = (
            F.interpolate(x.view(prompts, 1, *previous), size=size, mode="bilinear", align_corners=False).view(prompts, -1)
            for x in (coarse, variance)
        )
        points = min(level_points(decoder.adaptive_points, levels, level), size[0] * size[1])
        table = level_table(size, points, image_rows)
        index = torch.topk(-coarse.abs(), points, dim=1).indices
        at_points, variance_at_points, kept = decoder.coarse_at(plan, table, index, class_ids, keep_trunk=True)
        coarse = coarse.scatter(1, index, at_points)
        variance = variance.scatter(1, index, variance_at_points)
    shape = (prompts, *output_size)
    if decoder.ugs_top_k == 0:
        return ImplicitDecoderOutput(coarse.view(shape), coarse.view(shape), variance.view(shape), None)
    fine = refine(decoder, plan, box_features, image_features, index, class_ids, table, kept, kept_positions="in order")
    final = coarse.scatter(1, index, fine)
    return ImplicitDecoderOutput(final.view(shape), coarse.view(shape), variance.view(shape), index)
