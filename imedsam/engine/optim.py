"""Optimiser parameter groups."""

from __future__ import annotations

import torch.nn as nn

from imedsam.networks.checkpoint import OPTIONAL_PARTS

__all__ = ["parameter_groups"]

#: the parts that start from random weights (or zero gates), which train at the full learning rate
FROM_SCRATCH = ("decoder.", *OPTIONAL_PARTS)


def parameter_groups(network: nn.Module, lr: float, encoder_lr_scale: float = 0.05) -> list[dict]:
    """Trainable parameters in two groups, as in the official recipe: the implicit decoder (and the box-proposal
    head and the modality and content prompts, which start from random weights too) at ``lr``, everything
    else (LoRA, frequency adapters, prompt path, and SAM itself when it is not frozen) at ``lr * encoder_lr_scale``.
    Frozen parameters are left out. A DistributedDataParallel wrapper is looked through."""
    module = getattr(network, "module", network)
    decoder, other = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decoder if name.startswith(FROM_SCRATCH) else other).append(param)
    if not decoder and not other:
        raise ValueError("the network has no trainable parameter")
    groups = [{"params": decoder, "lr": lr}] if decoder else []
    if other:
        groups.append({"params": other, "lr": lr * encoder_lr_scale})
    return groups
