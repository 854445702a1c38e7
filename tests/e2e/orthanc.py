"""Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) as a DICOMweb store for one test: a temporary storage
folder, a free port, no DICOM listener, and stopped at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from label_server import free_port, stop_process_group, wait_until_answering

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_executable() -> str:
    executable = shutil.which("Orthanc")
    if executable is None or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc with its DICOMweb plugin is not installed: run `make e2e` (apt-get install orthanc orthanc-dicomweb)")
    return executable


class Orthanc:
    """Orthanc on 127.0.0.1 with its configuration in ``workdir``: ``url`` is ``http://127.0.0.1:PORT``,
    DICOMweb is at ``dicomweb``. :meth:`start` again after :meth:`stop` brings back the same store on the
    same port.

    Orthanc 1.10 has no setting for the address it binds, so ``RemoteAccessAllowed: false`` is what keeps it
    to this machine: it answers only requests from 127.0.0.1.
    """

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.port = workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps({
            "Name": "imedsam-e2e",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }, indent=2))  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        log_path = self.workdir / "orthanc.log"
        with open(log_path, "a") as log:
            self.process = subprocess.Popen(
                [orthanc_executable(), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        answers = lambda: httpx.get(f"{self.url}/system", timeout=5).status_code == 200  # noqa: E731
        wait_until_answering(self.process, answers, log_path, "Orthanc", timeout_s)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


@contextmanager
def orthanc(workdir: Path):
    """Run Orthanc in ``workdir``; yields the :class:`Orthanc`, stopped on exit."""
    server = Orthanc(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
