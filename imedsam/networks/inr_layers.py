"""Moved to :mod:`imedsam.networks.implicit.layers`; this module keeps the old import path working."""

from .implicit.layers import *  # noqa: F403
from .implicit.layers import __all__  # noqa: F401
