"""Moved to :mod:`imedsam.networks.adapters.frequency`; this module keeps the old import path working."""

from .adapters.frequency import *  # noqa: F403
from .adapters.frequency import __all__  # noqa: F401
