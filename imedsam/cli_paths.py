"""Output paths of the command line, checked before any work."""

from __future__ import annotations

import os

__all__ = ["check_output_path"]


def check_output_path(path: str, option: str, extensions: tuple[str, ...]) -> None:
    """Refuse, before any work, an output that names a folder, has no known extension, or cannot be
    created (a parent is a regular file, or the folder is not writable)."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; name a file in it, e.g. {os.path.join(path, 'mask.png')}")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ValueError(f"{option} {path} must end in one of {', '.join(extensions)}")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{option} {path} cannot be created: {existing} is not writable")
