"""Dataset folders that appear only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

__all__ = ["staged_dataset_folder"]


@contextlib.contextmanager
def staged_dataset_folder(output: str, overwrite: bool = False) -> Iterator[str]:
    """Yield ``OUTPUT.partial`` (with empty ``images/`` and ``masks/``) to write a dataset into.

    It replaces ``output`` when the block completes and is removed when the block raises, so a failed
    preparation never leaves a half-written dataset that a training run could pick up.
    """
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    partial = output.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "images"))
    os.makedirs(os.path.join(partial, "masks"))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(partial, output)
