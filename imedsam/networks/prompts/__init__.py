"""Prompts and prompt paths: the :class:`Prompts` value a user gives, and how a prompt and the image embedding
become the map the implicit decoder reads."""

from .box_path import BoxPromptPath
from .prompts import PROMPT_KINDS, Prompts, as_prompts

__all__ = ["BoxPromptPath", "PROMPT_KINDS", "Prompts", "as_prompts"]
