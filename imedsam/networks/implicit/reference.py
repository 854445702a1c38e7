"""The implicit decoder's method as the paper states it, written plainly: the reference for the fast decoder.

For each prompt: sample the box map and the image embedding at every query point, append the point's Fourier
encoding, run the coarse INR; T dropout passes of its head give each point's variance; the points with the
highest variance get the fine INR, whose input also holds the coarse head's features; their fine logits
replace the coarse ones. Nothing here is chunked, cached, folded or fused, so it is slow and takes memory in
proportion to the grid; :class:`~imedsam.networks.ImplicitSegmentationDecoder` computes the same numbers
fast, and the tests hold it to this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .coordinates import fourier_encoding, pixel_centres
from .plan import ImplicitDecoderOutput
from .decoder import ImplicitSegmentationDecoder

__all__ = ["reference_decode"]


def _sample(feature_map: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[C, h, w]`` map at ``[N, 2]`` normalised (x, y) points, bilinear, clamped at the border -> ``[N, C]``."""
    grid = points.view(1, 1, -1, 2)
    sampled = F.grid_sample(feature_map[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[0, :, 0].T


@torch.no_grad()
def reference_decode(
    decoder: ImplicitSegmentationDecoder,
    box_features: torch.Tensor,
    image_features: torch.Tensor,
    output_size: tuple[int, int],
    class_ids: torch.Tensor | None = None,
    query_lines: tuple[torch.Tensor, torch.Tensor] | None = None,
    extent: tuple[float, float] = (1.0, 1.0),
    mask_weights: torch.Tensor | None = None,
) -> ImplicitDecoderOutput:
    """What ``decoder.eval()(...)`` returns for the same arguments (exact mode), computed plainly.

    Uses the decoder's layers with their BatchNorm running statistics and its fixed inference dropout masks
    (``mc_masks``, and ``prior_mc_masks`` with a mask prior). Shapes as
    :meth:`ImplicitSegmentationDecoder.forward`.
    """
    if decoder.training:
        raise ValueError("the reference decodes as at inference: call decoder.eval() first")
    height, width = output_size
    rows, columns = query_lines if query_lines is not None else (torch.arange(height), torch.arange(width))
    grid_y, grid_x = torch.meshgrid(pixel_centres(height)[rows], pixel_centres(width)[columns], indexing="ij")
    points = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)  # (x, y) in the output's frame
    # the output covers the top-left extent of the maps (the image inside a letterboxed frame)
    map_points = (points + 1) * torch.tensor([extent[1], extent[0]]) - 1
    prompts = box_features.shape[0]
    class_ids = torch.zeros(prompts, dtype=torch.long) if class_ids is None else class_ids
    k = decoder.num_refined(points.shape[0])
    finals, coarses, variances, refined = [], [], [], []
    for p in range(prompts):
        box_map = box_features[p]
        if mask_weights is not None:
            # SAM's mask logit, and its T passes with dropped mask-head channels
            weighted = mask_weights[p][:, None, None] * box_map
            sam_logit = weighted.sum(dim=0, keepdim=True)
            sam_passes = torch.einsum("tc,chw->thw", decoder.prior_mc_masks, weighted)
            box_map = torch.cat([box_map, sam_logit])
        point_input = torch.cat(
            [_sample(box_map, map_points), _sample(image_features[p], map_points), fourier_encoding(points, decoder.num_frequencies)],
            dim=-1,
        )
        coarse_head = decoder.coarse_heads[int(class_ids[p])]
        trunk = decoder.coarse_trunk(decoder.coarse_input(point_input))
        head_out = coarse_head(trunk)  # dropout is off at inference
        coarse = head_out[:, 0]
        passes = torch.stack([coarse_head(trunk * mask)[:, 0] for mask in decoder.mc_masks], dim=-1)
        if mask_weights is None:
            variance = passes.var(dim=-1)
        else:
            prior = _sample(torch.cat([sam_logit, sam_passes]), map_points)  # [N, 1 + T]
            coarse = coarse + prior[:, 0]
            variance = torch.sigmoid(passes + prior[:, 1:]).var(dim=-1)
        final = coarse.clone()
        if k > 0:
            index = torch.topk(variance, k).indices
            fine_input = torch.cat([point_input[index], head_out[index, 1:]], dim=-1)
            fine_hidden = decoder.fine_trunk(decoder.fine_input(fine_input))
            fine = decoder.fine_heads[int(class_ids[p])](fine_hidden)[:, 0]
            final[index] = fine + (prior[index, 0] if mask_weights is not None else 0.0)
            refined.append(index)
        finals.append(final)
        coarses.append(coarse)
        variances.append(variance)
    shape = (prompts, len(rows), len(columns))
    return ImplicitDecoderOutput(
        torch.stack(finals).view(shape),
        torch.stack(coarses).view(shape),
        torch.stack(variances).view(shape),
        torch.stack(refined) if refined else None,
    )
