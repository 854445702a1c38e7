"""A checkpoint uploaded with ``PUT /model/{model}``: checked as the package checks one before it replaces the
served file, published atomically, and the file it replaces kept as ``<name>.previous.pt``."""

from __future__ import annotations

import copy
import logging
import os
import threading

import torch
from monailabel.utils.others.generic import file_checksum

from imedsam.networks import CheckpointError, IMedSAM

from lib.server.datastore import DatastoreRequestError, disk_errors_refused
from lib.server.storage import FileChanges

logger = logging.getLogger(__name__)

__all__ = ["check_checkpoint", "previous_path", "publish_checkpoint"]

_publishing = threading.Lock()


def previous_path(published: str) -> str:
    """Where the checkpoint an upload replaced is kept: ``model/imedsam.pt`` -> ``model/imedsam.previous.pt``."""
    root, extension = os.path.splitext(published)
    return f"{root}.previous{extension or '.pt'}"


def check_checkpoint(network: IMedSAM, path: str, name: str) -> None:
    """Refuse (400) a checkpoint the served network cannot load: read with ``weights_only=True``, every key
    and shape as the network's (:meth:`IMedSAM.load_checkpoint` on a copy of it), every value finite. The
    served model is not touched. Messages name the file as ``name``."""
    try:
        with torch.no_grad():
            model = copy.deepcopy(network).load_checkpoint(path)
            bad = [key for key, value in model.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    except CheckpointError as exc:
        raise DatastoreRequestError(400, f"the checkpoint cannot be served: {str(exc).replace(path, name)}") from None
    except (RuntimeError, ValueError, TypeError) as exc:  # a tensor torch cannot convert to the network's type
        first_line = (str(exc).replace(path, name).strip().splitlines() or [""])[0]
        raise DatastoreRequestError(400, f"the checkpoint {name} does not load into the served network: {type(exc).__name__}: {first_line}") from None
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DatastoreRequestError(400, f"the checkpoint {name} holds NaN or infinite values in {', '.join(bad[:5])}{more}")


def publish_checkpoint(network: IMedSAM, path: str, published: str, name: str) -> dict:
    """Check ``path`` (:func:`check_checkpoint`), then make it the served checkpoint ``published``: the file it
    replaces is kept as :func:`previous_path` (replacing the one kept before), both changes or neither; the
    infer tasks load the new file on their next request. Returns MONAI Label's answer (checksum, time) and the
    kept file's name."""
    check_checkpoint(network, path, name)
    previous = previous_path(published)
    with disk_errors_refused(f"the checkpoint {name!r}", "the served model was not changed"):
        with _publishing, FileChanges() as changes:
            kept = os.path.exists(published)
            if kept:
                changes.put(published, previous, link=True)
            changes.put(path, published)
    logger.info("published the uploaded checkpoint %s as %s%s", name, published, f"; the one it replaced is {previous}" if kept else "")
    stat = os.stat(published)
    return {
        "checksum": file_checksum(published),
        "modified_time": int(stat.st_mtime),
        "previous": os.path.basename(previous) if kept else None,
    }
