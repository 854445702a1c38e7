"""TinyViT's window attention through PyTorch's fused kernel when it trains.

TinyViT computes ``softmax(q k^T * scale + bias) v`` one operator at a time, so autograd keeps the
``[windows, heads, N, N]`` attention map, twice (the softmax's output and the second matmul's input), a large
share of what a training step holds (measured in ``docs/speed.md``, "Fused attention in training").
:func:`torch.nn.functional.scaled_dot_product_attention` computes the same function, and on a CPU
its flash kernel keeps only q, k, v, the output and a log-sum-exp per row for the backward pass (with TinyViT
frozen, as I-MedSAM trains it: a bias that needs a gradient sends PyTorch to its unfused kernel). Inference
keeps TinyViT's own forward: the eager reference the tests compare against, and the graph OpenVINO converts.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fused_window_attention", "use_fused_attention_in_training"]


def fused_window_attention(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's ``Attention.forward`` on ``x [windows, N, dim]`` through ``scaled_dot_product_attention``."""
    windows, tokens, _ = x.shape
    x = attention.norm(x)
    q, k, v = (
        attention.qkv(x)
        .view(windows, tokens, attention.num_heads, -1)
        .split([attention.key_dim, attention.key_dim, attention.d], dim=3)
    )
    bias = attention.attention_biases[:, attention.attention_bias_idxs] if attention.training else attention.ab
    # the CPU flash kernel takes a 4-d mask only: [1, heads, N, N] broadcasts over the windows
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.to(q.dtype).unsqueeze(0), scale=attention.scale
    )
    return attention.proj(out.transpose(1, 2).reshape(windows, tokens, attention.dh))


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self.training and torch.is_grad_enabled():
        return fused_window_attention(self, x)
    return type(self).forward(self, x)


def use_fused_attention_in_training(attention: nn.Module) -> None:
    """Make a TinyViT ``Attention`` run :func:`fused_window_attention` while it trains with autograd on.

    The module, its class and its state dict stay as they are (the forward is bound to the instance, which
    ``copy.deepcopy`` rebinds to the copy).
    """
    missing = [name for name in ("norm", "qkv", "proj", "attention_biases", "attention_bias_idxs", "key_dim", "d", "dh") if not hasattr(attention, name)]
    if missing:
        raise TypeError(f"{type(attention).__name__} is not TinyViT's attention: it lacks {missing}")
    attention.forward = types.MethodType(_forward, attention)
