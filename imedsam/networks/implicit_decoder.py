"""Moved to :mod:`imedsam.networks.implicit.decoder`; this module keeps the old import path working."""

from .implicit.decoder import *  # noqa: F403
from .implicit.decoder import __all__  # noqa: F401
