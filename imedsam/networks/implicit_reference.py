"""Moved to :mod:`imedsam.networks.implicit.reference`; this module keeps the old import path working."""

from .implicit.reference import *  # noqa: F403
from .implicit.reference import __all__  # noqa: F401
