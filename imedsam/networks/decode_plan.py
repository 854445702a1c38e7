"""Moved to :mod:`imedsam.networks.implicit.plan`; this module keeps the old import path working."""

from .implicit.plan import *  # noqa: F403
from .implicit.plan import __all__  # noqa: F401
