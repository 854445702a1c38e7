"""Moved to :mod:`imedsam.networks.implicit.adaptive`; this module keeps the old import path working."""

from .implicit.adaptive import *  # noqa: F403
from .implicit.adaptive import __all__  # noqa: F401
