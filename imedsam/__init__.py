"""I-MedSAM: implicit medical image segmentation with Segment Anything, for MONAI."""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("active_learning", "data", "engine", "inference", "losses", "metrics", "networks", "transforms", "visualize")


def __getattr__(name: str):
    # `import imedsam` stays light; `imedsam.networks` etc. load on first use (as bundle configs write them).
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'imedsam' has no attribute {name!r}")
