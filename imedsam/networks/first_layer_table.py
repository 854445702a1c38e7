"""Moved to :mod:`imedsam.networks.implicit.first_layer_table`; this module keeps the old import path working."""

from .implicit.first_layer_table import *  # noqa: F403
from .implicit.first_layer_table import __all__  # noqa: F401
