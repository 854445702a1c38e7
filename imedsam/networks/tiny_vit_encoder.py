"""Moved to :mod:`imedsam.networks.encoders.tiny_vit`; this module keeps the old import path working."""

from .encoders.tiny_vit import *  # noqa: F403
from .encoders.tiny_vit import __all__  # noqa: F401
