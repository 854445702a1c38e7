"""Moved to :mod:`imedsam.networks.encoders.fused_attention`; this module keeps the old import path working."""

from .encoders.fused_attention import *  # noqa: F403
from .encoders.fused_attention import __all__  # noqa: F401
