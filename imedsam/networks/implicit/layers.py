"""The implicit decoder's layers after the first: the trunk of each INR and the fine INR's head."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FineHead", "INRTrunk", "batch_norm_affine", "rename_legacy_keys", "rows_through"]


def batch_norm_affine(norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``norm(x) == x * scale + shift`` in eval mode."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def rows_through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` on ``x [..., C]`` as a ``[rows, C]`` batch, the shape BatchNorm1d wants."""
    return module(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


# Checkpoints written before these layers had names (nn.Sequential positions) still load: see rename_legacy_keys.
_LEGACY_TRUNK = {"0": "input_norm", "2": "linear", "3": "output_norm"}
_LEGACY_FINE_HEAD = {"0": "hidden", "1": "norm", "3": "output"}
_LEGACY_KEY = re.compile(r"(?P<head>(?:^|.*\.)(?:(?:coarse|fine)_trunk|fine_heads\.\d+))\.(?P<position>\d)\.(?P<tail>.+)$")


def rename_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the decoder's positional keys (``coarse_trunk.0.weight``, ``fine_heads.0.3.bias``, as
    checkpoints before version 0.3 hold them) renamed to the layers' names; other keys unchanged."""
    renamed = {}
    for key, value in state.items():
        match = _LEGACY_KEY.match(key)
        if match:
            names = _LEGACY_FINE_HEAD if ".fine_heads." in f".{match['head']}" else _LEGACY_TRUNK
            if match["position"] in names:
                key = f"{match['head']}.{names[match['position']]}.{match['tail']}"
        renamed[key] = value
    return renamed


class INRTrunk(nn.Module):
    """``first-layer output [N, C] -> features [N, width]``: BatchNorm, ReLU, Linear, BatchNorm, ReLU.

    The first layer itself is not here: the decoder evaluates it as a table (see
    :mod:`~imedsam.networks.implicit.first_layer_table`), and in eval mode :attr:`input_norm` is folded into that
    table (:meth:`input_fold`) and :attr:`output_norm` into :attr:`linear` (:meth:`folded`).
    """

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(in_width)
        self.linear = nn.Linear(in_width, width)
        self.output_norm = nn.BatchNorm1d(width)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.input_norm(first), inplace=True)
        return F.relu(self.output_norm(self.linear(hidden)), inplace=True)

    def input_fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode :attr:`input_norm` as ``(scale, shift)``, to fold into the first-layer table."""
        return batch_norm_affine(self.input_norm)

    def folded(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """The eval-mode trunk after a first layer that already includes :attr:`input_norm`: two in-place
        ReLUs around one matmul, in ``dtype``."""
        scale, shift = batch_norm_affine(self.output_norm)
        weight = (self.linear.weight * scale.unsqueeze(-1)).to(dtype)
        bias = (self.linear.bias * scale + shift).to(dtype)
        return lambda first: F.relu_(F.linear(F.relu_(first), weight, bias))


class FineHead(nn.Module):
    """The fine INR's per-class head: ``[N, C] -> [N, 1]`` logits, Linear, BatchNorm, ReLU, Linear."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_width, width)
        self.norm = nn.BatchNorm1d(width)
        self.output = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.relu(self.norm(self.hidden(x)), inplace=True))
