"""A real ``monailabel start_server`` for the tests: on 127.0.0.1 and a free port, started and stopped inside
the test, with a bounded wait for it to answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def label_server(app_dir: Path, studies: Path | str, workdir: Path, conf: list[str] = (), start_timeout: float = 120,
                 request_timeout: float = 120, env: dict[str, str] | None = None, launcher: list[str] | None = None):  # fmt: skip
    """Serve ``app_dir`` on ``studies`` (a folder or a DICOMweb URL) with ``--conf`` pairs ``conf`` and MONAI
    Label settings ``env``; yields an ``httpx.Client`` on it.

    ``launcher``: the command that takes ``start_server``'s arguments (default ``monailabel start_server``; the
    app's ``serve.py`` with its own options, for example).

    The server's output goes to ``workdir / "server.log"`` and its temporary files to ``workdir / "tmp"``
    (``TMPDIR``), where a test can count them; it is stopped (SIGTERM, then SIGKILL) on exit. The client's
    ``server`` attribute is the server's process.
    """
    (workdir / "tmp").mkdir(exist_ok=True)
    env = dict(
        os.environ,
        TMPDIR=str(workdir / "tmp"),
        MONAILABEL_PYEXE=sys.executable,
        MONAI_LABEL_TRACKING_ENABLED="false",
        MONAI_LABEL_AUTO_UPDATE_SCORING="false",
        MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # as in an activated environment: the DICOMweb datastore looks up dcmqi's tools on PATH
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **(env or {}),
    )
    port = free_port()
    launcher = launcher or [str(Path(sys.executable).parent / "monailabel"), "start_server"]
    command = [*launcher, "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), *conf]
    log_path = workdir / "server.log"
    log = open(log_path, "a")
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=request_timeout)
    client.server = process
    try:
        wait_until_answering(process, lambda: client.get("/info/").status_code == 200, log_path, "server", start_timeout)
        yield client
    finally:
        client.close()
        stop_process_group(process)
        log.close()


def wait_until_answering(process: subprocess.Popen, answers, log_path: Path, name: str, timeout_s: float) -> None:
    """Poll ``answers()`` until it is true; fail the test, with the log's tail, if ``process`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if answers():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not answer within {timeout_s:.0f} s")
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group started with ``start_new_session``, then SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
