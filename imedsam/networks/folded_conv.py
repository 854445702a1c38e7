"""Moved to :mod:`imedsam.networks.encoders.folded_conv`; this module keeps the old import path working."""

from .encoders.folded_conv import *  # noqa: F403
from .encoders.folded_conv import __all__  # noqa: F401
