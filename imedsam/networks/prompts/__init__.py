"""Prompts and prompt paths: the :class:`Prompts` value a user gives, and how a prompt and the image embedding
become the map the implicit decoder reads."""

from .box_path import BoxPromptPath
from .content import ContentPrompt
from .gated_tokens import ExtraTokenGates, run_two_way_transformer
from .modality import ANY_MODALITY, MODALITY_NAMES, ModalityPrompt
from .prompts import PROMPT_KINDS, Prompts, as_prompts

__all__ = [
    "ANY_MODALITY",
    "BoxPromptPath",
    "ContentPrompt",
    "ExtraTokenGates",
    "MODALITY_NAMES",
    "ModalityPrompt",
    "PROMPT_KINDS",
    "Prompts",
    "as_prompts",
    "run_two_way_transformer",
]
