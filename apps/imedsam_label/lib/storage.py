"""Files that a crash cannot tear: every write goes to a temporary file beside the target, then is renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from typing import Any

__all__ = ["PromptRecords", "copy_atomically", "remove_stale_temporaries", "write_json_atomically"]


def _replace_with(path: str, fill) -> None:
    """Write ``path`` through ``fill(file)`` into a temporary file in the same folder, then rename it over
    ``path``: readers (and a restart after ``kill -9``) see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def remove_stale_temporaries(folder: str, logger=None) -> list[str]:
    """Remove what an interrupted write left in ``folder`` (``.NAME.XXXX.tmp`` files, and the ``NAME.tmp`` of
    earlier versions): called at start, when no write can be running. Returns the names removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".tmp") and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed and logger:
        logger.warning("removed %d file(s) an interrupted write left in %s: %s", len(removed), folder, ", ".join(sorted(removed)))
    return removed


def write_json_atomically(path: str, value: Any) -> None:
    data = json.dumps(value, indent=2, default=str).encode("utf-8")
    _replace_with(path, lambda f: f.write(data))


def copy_atomically(source: str, path: str) -> None:
    def fill(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    _replace_with(path, fill)


class PromptRecords:
    """The last box prompted on each image (the box its UGS score uses), in the app's own JSON file.

    Kept out of the datastore's ``datastore_v2.json`` so that an infer does not rewrite that file; written
    atomically under a lock. A missing or unreadable file starts an empty record (the scores then use
    the whole image until the next prompt), which the log says.
    """

    def __init__(self, path: str, logger=None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    records = json.load(f)
                if not isinstance(records, dict):
                    raise ValueError("not a JSON object")
                self._records = records
            except (OSError, ValueError) as exc:
                if logger:
                    logger.warning("prompt records %s unreadable (%s): starting empty", path, exc)

    def get(self, image_id: str) -> dict | None:
        with self._lock:
            return self._records.get(image_id)

    def set(self, image_id: str, box, slice_index) -> None:
        with self._lock:
            self._records[image_id] = {"box": box, "slice": slice_index}
            write_json_atomically(self.path, self._records)
