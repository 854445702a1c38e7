"""SAM's two-way transformer with extra prompt tokens that enter through zero-initialised gates.

Appending a token to SAM's sparse prompts changes every softmax that has the tokens as keys, so even a token of
zeros moves the mask. Here an extra token is a key and value of its own beside the prompts, in the two places
where the tokens are keys (the tokens' self-attention and the image's attention to the tokens), and what it adds
to a query's attention output is ``gate * sigmoid(q . k / sqrt(d)) * v``, one gate per head. With the gates at
zero the result is bit for bit that of SAM's transformer (the warm start); the gates receive gradients from the
first step, and the tokens once the gates have moved. LLaMA-Adapter's zero-initialised attention gates its
adaption prompts the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

__all__ = ["ExtraTokenGates", "run_two_way_transformer"]


class ExtraTokenGates(nn.Module):
    """The gates of ``num_tokens`` extra tokens: ``[depth, 2, num_tokens, num_heads]``, zero at the start.

    Index 1 is the site (0: the tokens' self-attention, 1: the image's attention to the tokens) of each of the
    transformer's ``depth`` blocks.

    Example::

        >>> ExtraTokenGates(depth=2, num_tokens=2, num_heads=8).weight.shape
        torch.Size([2, 2, 2, 8])
    """

    def __init__(self, depth: int, num_tokens: int, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(depth, 2, num_tokens, num_heads))


def _heads(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, attention.num_heads, channels // attention.num_heads).transpose(1, 2)


def _attend(
    attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``attention(q, k, v)`` plus the gated contribution of the ``extra [P, E, C]`` tokens (``gate [E, heads]``).

    The first part repeats SAM's ``Attention.forward`` operation for operation, so that zero gates leave its
    output unchanged to the last bit."""
    q_heads = _heads(attention, attention.q_proj(q))
    k_heads = _heads(attention, attention.k_proj(k))
    v_heads = _heads(attention, attention.v_proj(v))
    scale = math.sqrt(q_heads.shape[-1])
    weights = torch.softmax(q_heads @ k_heads.permute(0, 1, 3, 2) / scale, dim=-1)
    out = weights @ v_heads
    extra_k = _heads(attention, attention.k_proj(extra))
    extra_v = _heads(attention, attention.v_proj(extra))
    # [P, heads, N, E]: each extra token is its own key, weighed by a sigmoid rather than competing in the softmax
    extra_weights = torch.sigmoid(q_heads @ extra_k.permute(0, 1, 3, 2) / scale) * gate.t().unsqueeze(1)
    out = out + extra_weights.to(extra_v.dtype) @ extra_v
    batch, heads, tokens, per_head = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * per_head))


def _block(block: TwoWayAttentionBlock, queries, keys, query_pe, key_pe, extra, gates) -> tuple[torch.Tensor, torch.Tensor]:
    # SAM's TwoWayAttentionBlock.forward, with the two attentions whose keys are the tokens gated
    if block.skip_first_layer_pe:
        queries = _attend(block.self_attn, queries, queries, queries, extra, gates[0])
    else:
        q = queries + query_pe
        queries = queries + _attend(block.self_attn, q, q, queries, extra, gates[0])
    queries = block.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    queries = block.norm2(queries + block.cross_attn_token_to_image(q=q, k=k, v=keys))
    queries = block.norm3(queries + block.mlp(queries))
    q = queries + query_pe
    k = keys + key_pe
    keys = block.norm4(keys + _attend(block.cross_attn_image_to_token, k, q, queries, extra, gates[1]))
    return queries, keys


def run_two_way_transformer(
    transformer: TwoWayTransformer,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    point_embedding: torch.Tensor,
    extra_tokens: torch.Tensor,
    gates: ExtraTokenGates,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformer(image_embedding, image_pe, point_embedding)`` with ``extra_tokens [P, E, C]`` beside the
    prompts, through ``gates``. Shapes as SAM's: ``image_embedding``/``image_pe [P, C, h, w]``,
    ``point_embedding [P, T, C]``; returns the tokens ``[P, T, C]`` and the image tokens ``[P, h*w, C]``."""
    if gates.weight.shape[0] != len(transformer.layers) or gates.weight.shape[2] != extra_tokens.shape[1]:
        raise ValueError(f"gates {tuple(gates.weight.shape)} do not fit {len(transformer.layers)} blocks and {extra_tokens.shape[1]} extra tokens")
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for layer, layer_gates in zip(transformer.layers, gates.weight):
        queries, keys = _block(layer, queries, keys, point_embedding, key_pe, extra_tokens, layer_gates)
    attn_out = transformer.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys
