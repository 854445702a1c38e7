"""Files that a crash cannot tear: every write goes to a temporary file beside the target, then is renamed.

:class:`FileChanges` groups several such replacements (a label and the datastore record, an image, its labels
and the record) so that a failure part-way puts every file back as it was. :func:`storage_problem` turns the
``OSError`` of a failed write into the HTTP status and message a client gets: 507 for a full disk, 503 for
other I/O failures, naming what could not be written and never a server path.

Every file written here gets mode :data:`FILE_MODE` (0644, less the process's umask): labels, the datastore
record, prompt records, training statistics and published models alike, as the images a client uploads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from typing import Any

__all__ = [
    "FileChanges",
    "PromptRecords",
    "copy_atomically",
    "link_atomically",
    "remove_stale_temporaries",
    "remove_stale_uploads",
    "storage_problem",
    "write_json_atomically",
]

_logger = logging.getLogger(__name__)

#: errors of a disk that is full (507 Insufficient Storage)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: errors of a disk that cannot be written or read just now (503 Service Unavailable)
DISK_UNAVAILABLE = (errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EAGAIN)
# a disk (or file system) without hard links answers os.link with one of these
#: the mode of every file written here, less the process's umask; ``mkstemp`` alone would leave 0600
FILE_MODE = 0o644
# the umask can only be read by setting it: once, at import, before any worker thread writes
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_NO_LINKS = (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS)
_STAGING = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def storage_problem(exc: OSError, what: str | None = None, outcome: str = "nothing of it was changed") -> tuple[int, str] | None:
    """``(status, message)`` for an ``OSError`` of the disk (507 full, 503 unavailable), or None for another
    error. ``what`` says what could not be written ("the label for image 'x'"); without it the file's base
    name is used (a staging file's name is read back to its target's). ``outcome`` says what became of the
    request. No server path is named."""
    if exc.errno in FULL_DISK:
        status, reason, advice = 507, "the server's disk is full", "retry when the server has room"
    elif exc.errno in DISK_UNAVAILABLE:
        status, reason, advice = 503, f"the server's disk could not be written ({os.strerror(exc.errno)})", "retry later"
    else:
        return None
    if what is None:
        name = os.path.basename(os.fspath(exc.filename)) if exc.filename else ""
        match = _STAGING.match(name)
        what = repr(match.group("name") if match else name) if name else "a file"
    return status, f"{what} could not be written: {reason}; {outcome}. {advice[0].upper()}{advice[1:]}"


def _replace_with(path: str, fill) -> None:
    """Write ``path`` through ``fill(file)`` into a temporary file in the same folder, then rename it over
    ``path``: readers (and a restart after ``kill -9``) see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(handle, FILE_MODE & ~_UMASK)
        with os.fdopen(handle, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def remove_stale_temporaries(folder: str, logger=None, ours_only: bool = False) -> list[str]:
    """Remove what an interrupted write left in ``folder`` (``.NAME.XXXX.tmp`` files, and the ``NAME.tmp`` of
    earlier versions; with ``ours_only``, in a folder of the user's such as the studies, only the first
    form): called at start, when no write can be running. Returns the names removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        ours = _STAGING.match(name) or (not ours_only and name.endswith(".tmp"))
        if ours and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed and logger:
        logger.warning("removed %d file(s) an interrupted write left in %s: %s", len(removed), folder, ", ".join(sorted(removed)))
    return removed


def remove_stale_uploads(folder: str, logger=None) -> list[str]:
    """Remove the per-request upload folders (``tmpXXXX``, :mod:`lib.server.guard`) that a killed server left in
    ``folder``: called at start, when no request can be running. Returns the names removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith("tmp") and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed and logger:
        logger.warning("removed %d upload folder(s) an interrupted request left in %s", len(removed), folder)
    return removed


def _temporary_name(path: str) -> str:
    """A unique ``.NAME.XXXX.tmp`` beside ``path``, the form :func:`remove_stale_temporaries` removes."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


class FileChanges:
    """Files replaced and removed together: after :meth:`rollback` every one is as it was before, after
    :meth:`commit` the kept old versions are gone. Used as a context manager, an exception rolls back.

    A replaced file's old version is kept as a hard link (no space needed, and the file is never missing for
    a reader), or as a copy where links are not supported; a removed file is renamed aside. Both are
    ``.NAME.XXXX.tmp`` files beside it, which :func:`remove_stale_temporaries` clears at start should the
    server be killed in between.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, str | None]] = []  # (path, its old version or None: it did not exist)

    def __enter__(self) -> FileChanges:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.rollback()

    def _keep(self, path: str) -> str:
        kept = _temporary_name(path)
        link_atomically(path, kept)  # no space needed where the disk has hard links
        return kept

    def put(self, source: str, path: str, link: bool = False) -> None:
        """Replace ``path`` with a copy of ``source`` (atomically), keeping the old file until :meth:`commit`.
        With ``link``, ``path`` becomes a hard link to ``source`` where the disk allows (no space needed; fine
        for files that are only ever replaced, never written in place)."""
        kept = self._keep(path) if os.path.exists(path) else None
        try:
            if link:
                link_atomically(source, path)
            else:
                copy_atomically(source, path)
        except BaseException:
            if kept:
                os.remove(kept)
            raise
        self._undo.append((path, kept))

    def remove(self, path: str) -> None:
        """Remove ``path`` (if it exists), keeping it aside until :meth:`commit`."""
        if os.path.exists(path):
            aside = _temporary_name(path)
            os.replace(path, aside)
            self._undo.append((path, aside))

    def rollback(self) -> None:
        for path, old in reversed(self._undo):
            try:
                if old is None:  # a new file
                    os.remove(path)
                else:
                    os.replace(old, path)
            except OSError as exc:  # keep undoing the others; the log says which file stayed changed
                _logger.error("could not put %s back as it was: %s", path, exc)
        self._undo.clear()

    def commit(self) -> None:
        for _, old in self._undo:
            if old is not None and os.path.exists(old):
                os.remove(old)
        self._undo.clear()


def write_json_atomically(path: str, value: Any) -> None:
    data = json.dumps(value, indent=2, default=str).encode("utf-8")
    _replace_with(path, lambda f: f.write(data))


def copy_atomically(source: str, path: str) -> None:
    def fill(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    _replace_with(path, fill)


def link_atomically(source: str, path: str) -> None:
    """Make ``path`` a hard link to ``source`` (a copy where the disk has no hard links), atomically."""
    staging = _temporary_name(path)
    try:
        os.link(source, staging)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        copy_atomically(source, path)
        return
    try:
        os.replace(staging, path)
    except BaseException:
        if os.path.lexists(staging):
            os.remove(staging)
        raise


class PromptRecords:
    """The last box prompted on each image (the box its UGS score uses), in the app's own JSON file.

    Kept out of the datastore's ``datastore_v2.json`` so that an infer does not rewrite that file; written
    atomically under a lock. A missing or unreadable file starts an empty record (the scores then use
    the whole image until the next prompt), which the log says. Writing is best effort: a write that fails
    (a full disk) is logged, the record stays in memory and is written with the next prompt that can be.
    """

    def __init__(self, path: str, logger=None) -> None:
        self.path = path
        self.logger = logger or _logger
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

    def set(self, image_id: str, box, slice_index) -> bool:
        """Record the prompt; False (and a warning in the log) when the file could not be written."""
        with self._lock:
            self._records[image_id] = {"box": box, "slice": slice_index}
            try:
                write_json_atomically(self.path, self._records)
            except Exception as exc:  # best effort: the prompt's answer must not depend on this file
                self.logger.warning(
                    "could not write the prompt records (%s: %s); the last box prompted on %r is kept in memory and "
                    "written with the next prompt", type(exc).__name__, exc, image_id,
                )  # fmt: skip
                return False
            return True
