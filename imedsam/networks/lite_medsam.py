"""Moved to :mod:`imedsam.networks.encoders.lite_medsam`; this module keeps the old import path working."""

from .encoders.lite_medsam import *  # noqa: F403
from .encoders.lite_medsam import __all__  # noqa: F401
