"""Request bodies too large, and clients too slow or too many, against real servers serving the app (127.0.0.1).

Issue 38, item 11: a body above ``--conf max_request_mb`` is a 413 from its ``Content-Length`` before any of it is
read, and a chunked one is cut off at the limit (``lib/server/body_limit.py``), under ``monailabel start_server``.
Item 12: the app's ``serve.py`` closes connections that send no request head, trickle it or stall their body,
refuses connections above ``--max_connections`` and keeps answering with more idle connections open than
``--limit_concurrency``. Every socket has a timeout and every loop a bound.
"""

import json
import os
import select
import shutil
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
from imedsam.data import synthetic_polyp  # noqa: E402
from label_server import label_server  # noqa: E402
from upload_files import png_bytes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (72, 96)
LIMIT_MB = 1
CONF = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", "64",
        "--conf", "label", "polyp", "--conf", "max_request_mb", str(LIMIT_MB)]  # fmt: skip
# serve.py's limits, small enough to test in seconds; it runs with 256 open files at most, and its default
# max_connections is then 4 x limit_concurrency = 16 (below 256 / 2 - backlog)
BOUNDS = {"limit_concurrency": 4, "backlog": 16, "header_timeout": 2.0, "body_timeout": 2.0, "timeout_keep_alive": 1,
          "max_header_bytes": 16384}
OPEN_FILES = 256
MAX_CONNECTIONS = 16


def _serve(tmp_path_factory, name: str, launcher=None):
    root = tmp_path_factory.mktemp(name)
    app_dir, studies = root / "app", root / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "uploads", "__pycache__"))
    studies.mkdir()
    for i in range(2):
        (studies / f"img_{i}.png").write_bytes(png_bytes(synthetic_polyp(SHAPE, seed=i)[0]))
    launch = launcher(app_dir) if launcher else None
    return root, app_dir, label_server(app_dir, studies, root, CONF, launcher=launch)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``monailabel start_server`` with a 1 MiB body limit."""
    root, app_dir, serving = _serve(tmp_path_factory, "limits")
    with serving as client:
        yield {"client": client, "root": root, "app_dir": app_dir, "port": client.base_url.port}


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """The app's ``serve.py`` with small limits, in a process limited to :data:`OPEN_FILES` open files."""

    def launcher(app_dir):
        options = [item for key, value in BOUNDS.items() for item in (f"--{key}", str(value))]
        return ["bash", "-c", f'ulimit -n {OPEN_FILES} && exec "$0" "$@"', sys.executable, str(app_dir / "serve.py"), *options]

    root, app_dir, serving = _serve(tmp_path_factory, "bounded", launcher)
    with serving as client:
        yield {"client": client, "root": root, "port": client.base_url.port}


# -- raw HTTP ------------------------------------------------------------------------------------------------
def _connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _read_response(sock: socket.socket, deadline_s: float = 10) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response (``Content-Length`` framed), within ``deadline_s``."""
    data = b""
    deadline = time.monotonic() + deadline_s
    while b"\r\n\r\n" not in data:
        assert time.monotonic() < deadline, f"no response head within {deadline_s} s: {data[:200]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response head: {data[:200]!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        assert time.monotonic() < deadline, "the response body did not arrive in time"
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a response body"
        body += chunk
    return status, headers, body


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (its data read and dropped), or None if it was open after ``seconds``."""
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start
    return None


def _head(method: str, target: str, port: int, *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _multipart(name: str, filename: str, content: bytes, boundary: str = "imedsam-test") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# -- item 11: the request body limit --------------------------------------------------------------------------
@pytest.mark.parametrize("expect_continue", [False, True])
def test_a_declared_2_gib_body_is_a_413_before_any_of_it_is_sent(server, expect_continue):
    tmp_before = set(os.listdir(server["root"] / "tmp"))
    extra = ["Expect: 100-continue"] if expect_continue else []
    with _connect(server["port"]) as sock:
        started = time.monotonic()
        sock.sendall(_head("PUT", "/datastore/image?image=huge", server["port"], "Content-Type: multipart/form-data; boundary=x",
                           f"Content-Length: {2 << 30}", *extra))  # fmt: skip
        status, headers, body = _read_response(sock)  # not one byte of the body was sent
        assert time.monotonic() - started < 5
        assert status == 413, body
        detail = json.loads(body)["detail"]
        assert f"{2 << 30:,} bytes" in detail and f"{LIMIT_MB << 20:,} bytes" in detail and "max_request_mb" in detail, detail
        assert headers.get("connection") == "close"
        assert _closed_within(sock, 5) is not None, "the connection stayed open after the 413"
    assert set(os.listdir(server["root"] / "tmp")) == tmp_before, "the refused body was spooled"
    assert not (server["root"] / "studies" / "huge.png").exists()
    assert server["client"].get("/info/").status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    port = server["port"]
    piece = b"\0" * (64 << 10)
    with _connect(port) as sock:
        sock.sendall(_head("PUT", "/datastore/image?image=chunked", port, "Content-Type: multipart/form-data; boundary=x",
                           "Transfer-Encoding: chunked"))  # fmt: skip
        sock.sendall(_chunk(b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"chunked.png\"\r\n\r\n"))
        sent = 0
        for _ in range(16 * LIMIT_MB * 16):  # 64 KiB pieces up to 16 times the limit
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(_chunk(piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status, _, body = _read_response(sock)
    assert status == 413, body
    assert "larger than the limit" in json.loads(body)["detail"]
    # answered while the client was still sending (the socket buffers hold a few MiB at most)
    assert sent < 16 * (LIMIT_MB << 20), "the server did not answer before the whole body was sent"
    assert not (server["root"] / "studies" / "chunked.png").exists()
    assert server["client"].get("/info/").status_code == 200


def test_uploads_under_the_limit_still_work_with_or_without_content_length(server):
    client = server["client"]
    picture = png_bytes(synthetic_polyp(SHAPE, seed=5)[0])
    response = client.put("/datastore/image?image=fits", files={"file": ("fits.png", picture)})
    assert response.status_code == 200, response.text
    body, content_type = _multipart("file", "fits_chunked.png", picture)

    def pieces():  # a generator body: httpx sends it chunked, without Content-Length
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.put("/datastore/image?image=fits_chunked", content=pieces(), headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    studies = server["root"] / "studies"
    assert (studies / "fits.png").read_bytes() == picture and (studies / "fits_chunked.png").read_bytes() == picture


# -- item 12: slow and idle clients under serve.py ----------------------------------------------------------
def test_serve_py_answers_with_more_idle_connections_than_its_limit_and_closes_them(bounded):
    port = bounded["port"]
    log = bounded["root"] / "server.log"
    lines = len(log.read_text().splitlines())
    with ExitStack() as stack:
        idle = [stack.enter_context(_connect(port)) for _ in range(2 * BOUNDS["limit_concurrency"])]
        time.sleep(0.3)
        with _connect(port) as sock:  # over limit_concurrency: a 503 at once is the bounded answer
            sock.sendall(_head("GET", "/info/", port, "Connection: close"))
            status, _, _ = _read_response(sock)
        assert status in (200, 503)
        # silent connections are closed after header_timeout
        waited = [_closed_within(sock, BOUNDS["header_timeout"] + 5) for sock in idle]
        assert all(w is not None for w in waited), f"idle connections left open: {waited}"
    deadline = time.monotonic() + 10
    while (status := bounded["client"].get("/info/").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
    new = log.read_text().splitlines()[lines:]
    assert len(new) <= 4, f"the idle connections were logged line by line: {new}"


def test_serve_py_refuses_connections_above_max_connections_at_once_and_keeps_its_files(bounded):
    port = bounded["port"]
    log = bounded["root"] / "server.log"
    assert f"max_connections {MAX_CONNECTIONS}," in log.read_text()
    lines = len(log.read_text().splitlines())
    count = OPEN_FILES + 50  # more connections than the server may open files
    with ExitStack() as stack:
        socks = [stack.enter_context(_connect(port)) for _ in range(count)]
        answers = []
        for sock in socks:  # each one is refused at once, or held until header_timeout closes it
            sock.settimeout(BOUNDS["header_timeout"] + 3)
            try:
                answers.append(sock.recv(100)[:12])
            except TimeoutError:
                answers.append(None)
        # the server held 16 at a time; while the client connected, held ones timed out and new ones took their place
        assert answers.count(b"HTTP/1.1 503") > count // 2, answers
        assert set(answers) <= {b"HTTP/1.1 503", b""}, "a connection was neither refused nor closed"
    time.sleep(BOUNDS["header_timeout"] + 0.5)
    assert bounded["client"].get("/info/").status_code == 200
    new = log.read_text().splitlines()[lines:]
    assert len(new) <= 4, f"the refused connections were logged line by line: {new}"
    assert "out of system resource" not in log.read_text(), "the server ran out of files"


def test_serve_py_closes_a_connection_that_trickles_its_request_head(bounded):
    port = bounded["port"]
    with _connect(port) as sock:
        sock.sendall(b"GET /info/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        closed = False
        for i in range(100):  # one header byte every 0.1 s, for at most 10 s
            try:
                sock.sendall(b"X-Slow: 1\r\n"[i % 11 : i % 11 + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if _closed_within(sock, 0.1) is not None:
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, "a trickled request head kept its connection open"
    assert BOUNDS["header_timeout"] - 0.5 < elapsed < BOUNDS["header_timeout"] + 3, elapsed


def test_serve_py_refuses_an_incomplete_request_head_above_max_header_bytes(bounded):
    port = bounded["port"]
    with _connect(port) as sock:  # a head that goes on and on: the server holds max_header_bytes of it at most
        sock.sendall(_head("GET", "/info/", port, "X-Big: " + "a" * (BOUNDS["max_header_bytes"] + 1000))[:-4])
        status, _, body = _read_response(sock)
    assert status == 400, body
    assert bounded["client"].get("/info/").status_code == 200


def test_serve_py_closes_a_request_whose_body_stalls(bounded):
    port = bounded["port"]
    with _connect(port) as sock:
        sock.sendall(_head("POST", "/infer/imedsam?image=img_0&output=json", port,
                           "Content-Type: multipart/form-data; boundary=x", "Content-Length: 100000"))  # fmt: skip
        sock.sendall(b"--x\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{")
        closed = _closed_within(sock, BOUNDS["body_timeout"] + 5)
    assert closed is not None and closed > BOUNDS["body_timeout"] - 0.5, closed
    assert bounded["client"].get("/info/").status_code == 200


def test_serve_py_closes_an_idle_keep_alive_connection_and_serves_the_same_app(bounded):
    port = bounded["port"]
    with _connect(port) as sock:
        sock.sendall(_head("GET", "/info/", port))
        status, _, body = _read_response(sock)
        assert status == 200 and json.loads(body)["name"] == "I-MedSAM"
        assert "imedsam" in json.loads(body)["models"]
        closed = _closed_within(sock, BOUNDS["timeout_keep_alive"] + 3)
    assert closed is not None, "an idle keep-alive connection stayed open"
    # the app's own guard and body limit are there too
    assert bounded["client"].get("/datastore/label?image=../x&tag=final").status_code == 404
    with _connect(port) as sock:
        sock.sendall(_head("PUT", "/datastore/image?image=huge", port, f"Content-Length: {2 << 30}"))
        assert _read_response(sock)[0] == 413
