"""Disk faults injected into a server the tests start (``tests/label_server.py``), for full-disk cases without
a full disk: with this folder first on ``PYTHONPATH`` and ``IMEDSAM_TEST_FAULTS`` naming a JSON file, every
``os.fsync`` of a file whose path matches one of that file's glob patterns fails with the errno it names,
e.g. ``{"*/labels/final/.img_1.png.*": "ENOSPC"}``. The file is read at each fsync, so a test changes the
faults of a running server by rewriting it; without the variable nothing is changed.

A full disk shows at fsync in the app: every file it writes goes to a temporary file that is flushed and
fsynced before it is renamed into place (``lib.server.storage``).
"""

import errno
import fnmatch
import json
import os

_CONTROL = os.environ.get("IMEDSAM_TEST_FAULTS")

if _CONTROL:
    _fsync = os.fsync

    def _faulty_fsync(fd):
        try:
            with open(_CONTROL, encoding="utf-8") as f:
                rules = json.load(f)
        except (OSError, ValueError):
            rules = {}
        if rules:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            for pattern, name in rules.items():
                if fnmatch.fnmatch(path, pattern):
                    code = getattr(errno, name)
                    raise OSError(code, os.strerror(code), path)
        return _fsync(fd)

    os.fsync = _faulty_fsync
