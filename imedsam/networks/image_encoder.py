"""Moved to :mod:`imedsam.networks.encoders.sam_vit`; this module keeps the old import path working."""

from .encoders.sam_vit import *  # noqa: F403
from .encoders.sam_vit import __all__  # noqa: F401
