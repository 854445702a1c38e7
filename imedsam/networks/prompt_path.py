"""Moved to :mod:`imedsam.networks.prompts.box_path`; this module keeps the old import path working."""

from .prompts.box_path import *  # noqa: F403
from .prompts.box_path import __all__  # noqa: F401
