"""Prompt paths: how a prompt and the image embedding become the map the implicit decoder reads."""

from .box_path import BoxPromptPath

__all__ = ["BoxPromptPath"]
