"""The INRs' per-class heads under MC dropout: the coarse logit, its variance over the dropout passes (what UGS
ranks points by), the features the coarse INR hands to the fine INR, and the fine logit.

Each function takes a decoder's ``coarse_heads`` (per class, a ``Linear`` whose row 0 is the logit and rows
1.. the features) or ``fine_heads`` and applies to each prompt the head of its class. Dropout acts on the
coarse trunk's output, so the T passes share the trunk and repeat only the head's logit row; and since
``(mask * h) . w = h . (mask * w)``, the masks act on that weight row: the ``[points, width]`` masked trunk is
never made (its elementwise product costs as much as the head). The masks come from the call's
:class:`~imedsam.networks.implicit.plan.DecodePlan`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import rows_through
from .plan import DecodePlan

__all__ = [
    "coarse_features",
    "coarse_features_to_fine",
    "coarse_logit",
    "fine_logit",
    "logit_variance",
    "per_class",
    "with_mask_prior",
]


def per_class(
    heads: nn.ModuleList, fn: Callable, x: torch.Tensor, class_ids: torch.Tensor, out_dim: int, assignment=None
) -> torch.Tensor:
    """``fn(head, x_of_its_prompts, their_assignment)`` with each class's head on that class's prompts of
    ``x [P, N, C]``; ``[P, N, out_dim]``."""
    if len(heads) == 1:
        return fn(heads[0], x, assignment)
    out = None
    for cls in torch.unique(class_ids).tolist():
        rows = class_ids == cls
        result = fn(heads[cls], x[rows], None if assignment is None else assignment[rows])
        if out is None:  # the heads' dtype, which differs from a bfloat16 trunk's
            out = result.new_zeros(*x.shape[:-1], out_dim)
        out[rows] = result
    return out


def coarse_logit(heads: nn.ModuleList, plan: DecodePlan, trunk: torch.Tensor, class_ids, assignment=None) -> torch.Tensor:
    """The coarse logit ``[P, N]`` from the trunk output ``[P, N, width]``; in training each point's trunk output
    is masked by its assigned mask (``assignment [P, N]``, rows of ``plan.dropout.pool``)."""

    def head(layer, h, assigned):
        weight, bias = layer.weight[:1].to(h.dtype), layer.bias[:1].to(h.dtype)
        if not plan.training:
            return F.linear(h, weight, bias).float()
        per_mask = F.linear(h, plan.dropout.pool.to(h.dtype) * weight, bias)  # [..., pool]
        return per_mask.gather(-1, assigned.unsqueeze(-1))

    return per_class(heads, head, trunk, class_ids, 1, assignment).squeeze(-1)


def logit_variance(heads: nn.ModuleList, plan: DecodePlan, trunk: torch.Tensor, class_ids, prior: torch.Tensor | None = None):
    """MC-dropout variance per point ``[P, N]`` over the plan's T passes: of the coarse logit, or with a mask
    prior (``prior [P, N, 1 + T]``, SAM's logit and its T dropout passes) of the probability
    ``sigmoid(prior_t + correction_t)``."""
    masks = plan.dropout.passes.to(trunk.dtype)
    with_bias = prior is not None  # the bias does not change the variance of a logit, but does of a probability

    def passes(layer, h, _):
        bias = layer.bias[:1].to(h.dtype) if with_bias else None
        return F.linear(h.detach(), (layer.weight[:1] * masks).to(h.dtype), bias).float()

    logits = per_class(heads, passes, trunk, class_ids, masks.shape[0])
    if prior is None:
        return logits.var(dim=-1)
    return torch.sigmoid(logits + prior[..., 1:].detach()).var(dim=-1)


def coarse_features(heads: nn.ModuleList, plan: DecodePlan, trunk: torch.Tensor, class_ids, assignment=None) -> torch.Tensor:
    """The features ``[P, K, F]`` the coarse INR hands to the fine INR; in training through each point's
    assigned dropout mask."""

    def head(layer, h, assigned):
        if plan.training:
            h = h * plan.dropout.pool[assigned].to(h.dtype)
        return F.linear(h, layer.weight[1:].to(h.dtype), layer.bias[1:].to(h.dtype)).float()

    return per_class(heads, head, trunk, class_ids, heads[0].out_features - 1, assignment)


def coarse_features_to_fine(heads: nn.ModuleList, trunk: torch.Tensor, class_ids, feature_w: torch.Tensor) -> torch.Tensor:
    """At inference, the fine INR's first-layer input from the coarse trunk ``[P, K, C]``: the coarse head's
    feature rows and the fine layer's columns ``feature_w`` that read them, composed into one layer
    (``W_f (W_h h + b_h) = (W_f W_h) h + W_f b_h``), so the ``[K, F]`` features are never made."""

    def composed(head, h, _):
        return F.linear(h, (feature_w @ head.weight[1:]).to(h.dtype), (feature_w @ head.bias[1:]).to(h.dtype)).float()

    return per_class(heads, composed, trunk, class_ids, feature_w.shape[0])


def fine_logit(heads: nn.ModuleList, hidden: torch.Tensor, class_ids) -> torch.Tensor:
    """The fine logit ``[P, K]`` from the fine trunk's output ``[P, K, C]``."""
    return per_class(heads, lambda head, h, _: rows_through(head, h), hidden, class_ids, 1).squeeze(-1)


def with_mask_prior(plan: DecodePlan, box_features: torch.Tensor, mask_weights: torch.Tensor | None):
    """SAM's mask head as a prior: the box map ``[P, C, hb, wb]`` with SAM's mask logit appended as a channel,
    and the prior table ``[P * hb * wb, 1 + T]`` of that logit and of its T dropout passes over the mask head's
    channels (``mask_weights [P, C]``). Without ``mask_weights``: the map as it is, and None."""
    if mask_weights is None:
        return box_features, None
    weighted = mask_weights[:, :, None, None] * box_features
    logit = weighted.sum(dim=1, keepdim=True)
    passes = torch.einsum("tc,pchw->pthw", plan.dropout.prior_passes.to(weighted.dtype), weighted.detach())
    prior = torch.cat([logit, passes], dim=1).permute(0, 2, 3, 1)
    return torch.cat([box_features, logit], dim=1), prior.reshape(-1, prior.shape[-1])
