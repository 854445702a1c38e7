"""Moved to :mod:`imedsam.networks.implicit.coordinates`; this module keeps the old import path working."""

from .implicit.coordinates import *  # noqa: F403
from .implicit.coordinates import __all__  # noqa: F401
