"""Moved to :mod:`imedsam.networks.adapters.lora`; this module keeps the old import path working."""

from .adapters.lora import *  # noqa: F403
from .adapters.lora import __all__  # noqa: F401
