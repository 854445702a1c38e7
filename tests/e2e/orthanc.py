"""Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) as a DICOMweb store for one test: a temporary storage
folder, a free port, no DICOM listener, and stopped at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.label_server import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_executable() -> str:
    executable = shutil.which("Orthanc")
    if executable is None or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc with its DICOMweb plugin is not installed: run `make e2e` (apt-get install orthanc orthanc-dicomweb)")
    return executable


@contextmanager
def orthanc(workdir: Path, start_timeout: float = 60):
    """Run Orthanc in ``workdir``; yields its base URL (``http://127.0.0.1:PORT``), DICOMweb at ``/dicom-web``.

    Orthanc 1.10 has no setting for the address it binds, so ``RemoteAccessAllowed: false`` is what keeps it
    to this machine: it answers only requests from 127.0.0.1.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "imedsam-e2e",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = open(workdir / "orthanc.log", "a")
    process = subprocess.Popen([orthanc_executable(), str(config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}:\n{(workdir / 'orthanc.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/system", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer within {start_timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
