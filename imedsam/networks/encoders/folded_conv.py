"""A frozen convolution followed by an eval-mode BatchNorm, run as one convolution (TinyViT's ``Conv2d_BN``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FoldedConvBN", "fold_conv_bn_pairs", "is_conv_bn_pair"]


def is_conv_bn_pair(module: nn.Module) -> bool:
    """A ``Sequential`` of exactly a ``Conv2d`` named ``c`` and a ``BatchNorm2d`` named ``bn`` (TinyViT's layout)."""
    children = dict(module.named_children())
    return (
        isinstance(module, nn.Sequential)
        and set(children) == {"c", "bn"}
        and isinstance(children["c"], nn.Conv2d)
        and isinstance(children["bn"], nn.BatchNorm2d)
    )


class FoldedConvBN(nn.Module):
    """``bn(c(x))`` as one convolution whose weight and bias absorb the BatchNorm, in channels-last layout.

    The module keeps ``c`` and ``bn`` as its children, so its state-dict keys are the pair's own. The folded
    weights are recomputed whenever one of the five tensors they come from changes (a checkpoint load, a
    move to another device). Folding is exact only for frozen weights and a BatchNorm in eval mode; in any
    other state the pair runs as it is.

    Shapes: ``[B, C_in, H, W] -> [B, C_out, H', W']``, as ``c``.
    """

    def __init__(self, pair: nn.Sequential) -> None:
        super().__init__()
        self.c, self.bn = pair.c, pair.bn
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _sources(self) -> tuple[torch.Tensor, ...]:
        return (self.c.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)

    def _folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        stamp = tuple((t.data_ptr(), t._version, t.device) for t in self._sources())
        if self._folded is None or self._folded[0] != stamp:
            with torch.no_grad():
                scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
                weight = (self.c.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                bias = self.bn.bias - self.bn.running_mean * scale
                if self.c.bias is not None:
                    bias = bias + self.c.bias * scale
            self._folded = (stamp, weight, bias)
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not (self.c.weight.requires_grad or self.bn.weight.requires_grad or self.bn.training)
        if not frozen or torch.jit.is_tracing():
            return self.bn(self.c(x))
        weight, bias = self._folded_weights()
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


def fold_conv_bn_pairs(module: nn.Module) -> int:
    """Replace every conv + BatchNorm pair under ``module`` by a :class:`FoldedConvBN`; how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if is_conv_bn_pair(child):
            setattr(module, name, FoldedConvBN(child))
            count += 1
        else:
            count += fold_conv_bn_pairs(child)
    return count
