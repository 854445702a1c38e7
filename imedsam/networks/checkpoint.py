"""Loading SAM checkpoints (resized to the training resolution) and I-MedSAM checkpoints."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .presets import OFFICIAL_SAM_CHECKPOINTS

__all__ = [
    "OPTIONAL_PARTS",
    "keep_missing_optional_parts",
    "CheckpointError",
    "read_state_dict",
    "verify_official_checkpoint",
    "resize_sam_state_dict",
    "load_sam_checkpoint",
    "load_state_dict_checked",
]

logger = logging.getLogger(__name__)

#: the state-dict prefixes of the parts a model may have that an older checkpoint may lack, each of which starts
#: untrained: the box-proposal head, MCP-MedSAM's prompt tokens with their gates and the volumetric adapters
OPTIONAL_PARTS = (
    "box_proposal.", "prompt_path.modality_prompt.", "prompt_path.content_prompt.", "prompt_path.token_gates.",
    "image_encoder.volumetric_adapters.", "prompt_path.decoder_lora.",
)  # fmt: skip
MODALITY_COUNTS = "prompt_path.modality_prompt.trained_images"
#: how to build a model that has an optional part a checkpoint brings
_PART_OPTIONS = {
    "image_encoder.volumetric_adapters.": "volumetric_adapter=True and the slab_depth it was trained with "
    "(imedsam predict --volumetric-adapter --slab-depth; bundle and app: volumetric_adapter true)",
    "prompt_path.modality_prompt.": "modality_prompt=True (imedsam predict --modality-prompt; bundle and app: modality_prompt true)",
    "prompt_path.content_prompt.": "content_prompt=True (imedsam predict --content-prompt; bundle and app: content_prompt true)",
    "prompt_path.decoder_lora.": "decoder_lora_rank set to the rank it was trained with (imedsam predict --decoder-lora-rank; "
    "bundle and app: decoder_lora_rank)",
}


def keep_missing_optional_parts(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """Complete ``state`` (a checkpoint read from ``source``) in place with the model's ``own`` tensors of every
    optional part it lacks entirely, so that everything else loads and the part keeps its start (an untrained box
    head, which ``propose_boxes`` refuses; prompts with zero gates)."""
    for part in OPTIONAL_PARTS:
        keys = [key for key in own if key.startswith(part)]
        if keys and not any(key in state for key in keys):
            logger.info("%s has no %s; the model's own, untrained, is kept", source, part[:-1])
            state.update({key: own[key] for key in keys})
    if MODALITY_COUNTS in own and MODALITY_COUNTS not in state and "prompt_path.modality_prompt.tokens.weight" in state:
        # saved before the counts were kept: which tokens trained is not known, so every one is used
        logger.warning("%s does not say which modality tokens were trained; every token is used as trained", source)
        state[MODALITY_COUNTS] = torch.ones_like(own[MODALITY_COUNTS])

SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
_LISTED_KEYS = 5


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _load_problem(exc: Exception) -> str:
    """What was wrong with a file ``torch.load(..., weights_only=True)`` refused, without torch's advice to load
    it unsafely: a checkpoint here is data, and one that needs more than tensors is refused, not retried."""
    text = str(exc)
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        reason = next((line.strip() for line in detail if line.strip()), "unsupported content")
        return f"not a checkpoint of tensors only ({reason}); it is corrupt, or holds code or objects that are not loaded"
    first_line = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from ``path`` (tensors only, never arbitrary pickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"could not read checkpoint {path}: {_load_problem(exc)}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} is not a plain state dict of tensors (got {type(state).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def verify_official_checkpoint(path: str | os.PathLike) -> bool:
    """Check the MD5 of an official SAM checkpoint, recognised by its file name.

    Returns True when the file is an official checkpoint with the right hash, False when its name is not
    one of :data:`OFFICIAL_SAM_CHECKPOINTS`; raises :class:`CheckpointError` on a hash mismatch.
    """
    name = os.path.basename(os.fspath(path))
    if name not in OFFICIAL_SAM_CHECKPOINTS:
        return False
    _, url, expected = OFFICIAL_SAM_CHECKPOINTS[name]
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CheckpointError(
            f"{path} has MD5 {digest.hexdigest()}, but the official {name} has {expected}: "
            f"the file is corrupt or incomplete; download it again from {url}"
        )
    return True


def _resize_position_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    # [1, g0, g0, C] -> [1, grid, grid, C]
    resized = F.interpolate(table.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(table.dtype)


def _resize_relative_position(table: torch.Tensor, length: int) -> torch.Tensor:
    # [L0, head_dim] -> [length, head_dim]
    resized = F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(table.dtype)


def resize_sam_state_dict(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize SAM's absolute position embedding and relative-position tables to the shapes in ``target``.

    SAM checkpoints are trained at 1024 (64x64 tokens); the encoder here is built at the training
    resolution, so ``pos_embed`` is interpolated bilinearly and the global blocks' ``rel_pos_h/w`` tables
    linearly along their length. Other keys are returned unchanged.
    """
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.dim() == 4:
            out[key] = _resize_position_embedding(value, target[key].shape[1])
        elif key.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w") and value.dim() == 2:
            out[key] = _resize_relative_position(value, target[key].shape[0])
    return out


def _describe_mismatch(
    source: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], hint: str = ""
) -> str | None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return None
    lines = [f"checkpoint {source} does not fit the model{hint}:"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if items:
            more = f" ... and {len(items) - _LISTED_KEYS} more" if len(items) > _LISTED_KEYS else ""
            lines.append(f"  {label} ({len(items)}): {', '.join(items[:_LISTED_KEYS])}{more}")
    for part, option in _PART_OPTIONS.items():
        if any(key.startswith(part) for key in unexpected):
            lines.append(f"  the checkpoint has {part[:-1]}: build the model with {option}")
    return "\n".join(lines)


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the file, keys and shapes."""
    expected = module.state_dict()
    problem = _describe_mismatch(source, state, expected, hint)
    if problem:
        raise CheckpointError(problem)
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_sam_checkpoint(path: str | os.PathLike, parts: Mapping[str, nn.Module], encoder: str) -> None:
    """Load an official-format SAM checkpoint (keys ``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``) into SAM's modules, resizing position tables to the modules' resolution.

    Args:
        path: the checkpoint file.
        parts: ``{"image_encoder": ..., "prompt_encoder": ..., "mask_decoder": ...}``.
        encoder: the preset name, used to make a size mismatch readable.
    """
    path = os.fspath(path)
    state = read_state_dict(path)
    if verify_official_checkpoint(path):
        logger.info("verified MD5 of official SAM checkpoint %s", path)
    if any(key.startswith(("image_encoder.vit.", "decoder.", "prompt_path.")) for key in state):
        raise CheckpointError(
            f"{path} is an I-MedSAM checkpoint, not a SAM checkpoint: load it as model_checkpoint "
            "(IMedSAM.load_checkpoint), and give sam_checkpoint an official SAM file"
        )
    prefixes = {key.split(".", 1)[0] for key in state}
    if not prefixes & set(SAM_PARTS):
        raise CheckpointError(
            f"{path} is not a SAM checkpoint: none of its keys start with {', '.join(SAM_PARTS)} "
            f"(found prefixes {sorted(prefixes)[:_LISTED_KEYS]}); an I-MedSAM checkpoint goes to model_checkpoint"
        )
    hint = f" built as {encoder!r} (is the checkpoint for another SAM size?)"
    for name in SAM_PARTS:
        module = parts[name]
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        sub = resize_sam_state_dict(sub, module.state_dict())
        load_state_dict_checked(module, sub, f"{path} [{name}]", hint)
