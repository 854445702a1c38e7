"""Hostile requests against the I-MedSAM label server, answered as a Markdown table (issue 38).

    python scripts/hostile_cases.py     # starts apps/imedsam_label/serve.py (vit_tiny) on 127.0.0.1, then stops it
    python scripts/hostile_cases.py --url http://127.0.0.1:8000 [--pid PID] [--max-request-mb 1088] \
        [--header-timeout 10]
    python scripts/hostile_cases.py --largest   # the largest picture and volume the default limits accept

Each case sends one hostile request (path traversal in tags and ids, boxes outside the image, a wrong-channel
picture, corrupt uploads and checkpoints, a declared 2 GiB body, a chunked body over the limit, a slow request
head, a bad training body, a NaN voxel on the prompted slice, ...) and prints what was expected, what the server
answered (its status and the first words of its ``detail``; an answer naming a server upload path fails) and the
server's peak resident memory above its idle level while the case ran (``/proc/PID/status`` ``VmRSS``, sampled
every 10 ms). The script exits 1 if any case fails. Against ``--url`` it uploads one picture and one volume (``hostile_picture``, ``hostile_nan_volume``) and
deletes them at the end; the server's PID is found from its port (psutil) unless ``--pid`` names it, and the
slow-head case waits ``--header-timeout`` (serve.py's; ``monailabel start_server`` never closes such a
connection, which this case then reports as a failure).

The HTTP plumbing comes from the tests: ``tests/label_server.py`` starts and stops the server, the raw-socket
helpers are ``tests/integration/test_label_limits.py``'s, the forged files ``tests/upload_files.py``'s.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from imedsam.data import synthetic_polyp  # noqa: E402
from integration.test_label_limits import _chunk, _closed_within, _connect, _head, _read_response  # noqa: E402
from label_server import label_server  # noqa: E402
from upload_files import forged_png, png_bytes  # noqa: E402

SHAPE = (72, 96)  # the picture's height, width
VOLUME = (40, 32, 6)
NAN_VOXEL = (12, 9, 2)  # i, j, k
PICTURE, VOLUME_ID = "hostile_picture", "hostile_nan_volume"
HEADER_TIMEOUT = 2.0  # serve.py's, when the script starts it
MAX_REQUEST_MB = 8


LARGEST_PICTURE = (7071, 7071)  # 49,999,041 pixels: the default max_image_pixels is 50,000,000
LARGEST_VOLUME = (512, 512, 1024)  # the default max_image_voxels, 268,435,456


def conf(max_request_mb: float | None = MAX_REQUEST_MB) -> list[str]:
    """The server's --conf: the test network; ``max_request_mb`` None keeps the app's default body limit (the
    largest volume it accepts)."""
    limit = [] if max_request_mb is None else ["--conf", "max_request_mb", str(max_request_mb)]
    return ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", "64",
            "--conf", "label", "polyp", *limit]  # fmt: skip


# -- the server's memory --------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def listening_pid(port: int) -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


class PeakRSS:
    """While the block runs, sample the server's resident memory every 10 ms; ``above_idle`` is the peak less the
    level just before (bytes), None without a PID."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.above_idle = pid, None

    def __enter__(self):
        if self.pid is None:
            return self
        self.idle = self.peak = rss_bytes(self.pid) or 0
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.01):
                self.peak = max(self.peak, rss_bytes(self.pid) or 0)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.pid is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, rss_bytes(self.pid) or 0)
            self.above_idle = self.peak - self.idle


# -- the files sent -------------------------------------------------------------------------------------------
def picture() -> bytes:
    return png_bytes(synthetic_polyp(SHAPE, seed=0)[0])


def nan_volume() -> bytes:
    volume = np.random.default_rng(0).normal(0, 100, VOLUME).astype(np.float32)
    volume[NAN_VOXEL] = np.nan
    image = nib.Nifti1Image(volume, np.eye(4))
    return gzip.compress(image.to_bytes(), mtime=0)


def largest_picture() -> bytes:
    """A 7071 x 7071 RGB PNG: a smooth gradient with a bright disc, so that the file is small and the decode is not."""
    height, width = LARGEST_PICTURE
    rows, columns = np.ogrid[:height, :width]
    grey = ((rows + columns) * (200 / (height + width))).astype(np.uint8)
    grey[(rows - 3500) ** 2 + (columns - 3500) ** 2 < 400**2] = 250
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def largest_volume() -> bytes:
    """A 512 x 512 x 1024 float32 NIfTI (1 GiB of voxels, gzipped to a few MB) with a bright block."""
    volume = np.zeros(LARGEST_VOLUME, np.float32)
    volume[200:300, 200:300, 500:520] = 100
    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), compresslevel=1, mtime=0)


def largest_cases() -> list[tuple[str, str, object]]:
    """The largest inputs the default limits accept, each answered: what a request can cost the server."""
    return [
        ("largest picture the limits accept (7071 x 7071 RGB, 50.0 MP; infer upload, a box)", "200",
         lambda c, **_: infer(c, "output=json", {"box": [3000, 3000, 4000, 4000]}, file=("largest.png", largest_picture()))),
        ("largest volume the limits accept (512 x 512 x 1024 float32; datastore upload)", "200",
         lambda c, **_: answer(c.put("/datastore/image?image=largest_volume", files={"file": ("largest.nii.gz", largest_volume())}))),
        ("a box on its slice 510 (2D task)", "200",
         lambda c, **_: infer(c, "image=largest_volume&output=json", {"box": [200, 200, 300, 300], "slice": 510})),
        ("its object's 3D box, 20 slices (3D task)", "200",
         lambda c, **_: answer(c.post("/infer/imedsam_3d?image=largest_volume&output=json",
                                      data={"params": json.dumps({"box3d": [200, 200, 500, 300, 300, 520]})}))),
        ("`/info/` afterwards", "200", lambda c, **_: answer(c.get("/info/"))),
    ]  # fmt: skip


def label(shape=SHAPE, value=1) -> bytes:
    array = np.zeros(shape, np.uint8)
    array[10:30, 20:50] = value
    return png_bytes(array)


def two_channel_picture() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.stack([synthetic_polyp(SHAPE, seed=1)[0][..., 0], np.full(SHAPE, 255, np.uint8)], -1), "LA").save(buffer, "PNG")
    return buffer.getvalue()


# -- the cases ------------------------------------------------------------------------------------------------
def answer(response: httpx.Response) -> tuple[str, str]:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return str(response.status_code), str(detail)


def infer(client, query: str, params, **files):
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return answer(client.post(f"/infer/imedsam?{query}", data=data, files=files or None))


def put_label(client, query: str, content: bytes, name: str = "label.png"):
    return answer(client.put(f"/datastore/label?{query}", files={"label": (name, content)}))


def declared_2_gib(client, port: int, **_):
    with _connect(port) as sock:
        sock.sendall(_head("PUT", "/datastore/image?image=huge", port, "Content-Type: multipart/form-data; boundary=x",
                           f"Content-Length: {2 << 30}"))  # fmt: skip
        status, _, body = _read_response(sock)
    return str(status), json.loads(body).get("detail", "")


def chunked_over_limit(client, port: int, limit_mb: float, **_):
    piece = b"\0" * (64 << 10)
    with _connect(port) as sock:
        sock.sendall(_head("PUT", "/datastore/image?image=chunked", port, "Content-Type: multipart/form-data; boundary=x",
                           "Transfer-Encoding: chunked"))  # fmt: skip
        sock.sendall(_chunk(b'--x\r\nContent-Disposition: form-data; name="file"; filename="chunked.png"\r\n\r\n'))
        for _ in range(int(4 * limit_mb * 16) + 16):  # 64 KiB pieces, up to 4 times the limit
            if select.select([sock], [], [], 0)[0]:
                break  # answered
            try:
                sock.sendall(_chunk(piece))
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, body = _read_response(sock)
    return str(status), json.loads(body).get("detail", "")


def slow_head(client, port: int, header_timeout: float, **_):
    with _connect(port) as sock:
        sock.sendall(b"GET /info/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        for i in range(int((header_timeout + 3) / 0.1)):  # a header byte every 0.1 s
            try:
                sock.sendall(b"X-Slow: 1\r\n"[i % 11 : i % 11 + 1])
            except (BrokenPipeError, ConnectionResetError):
                return "closed", f"after {time.monotonic() - started:.1f} s"
            if _closed_within(sock, 0.1) is not None:
                return "closed", f"after {time.monotonic() - started:.1f} s"
    return "open", f"still open after {header_timeout + 3:.0f} s"


def cases() -> list[tuple[str, str, object]]:
    """``(case, expected status, function(client, **context) -> (status, detail))``."""
    good_box = {"box": [10, 10, 60, 50]}
    return [
        ("label tag `../../escaped`", "400", lambda c, **_: put_label(c, f"image={PICTURE}&tag=../../escaped", label())),
        ("label tag URL-encoded `..%2F..%2Fescaped`", "400", lambda c, **_: put_label(c, f"image={PICTURE}&tag=%2E%2E%2F%2E%2E%2Fescaped", label())),
        ("label tag `/abs/path`", "400", lambda c, **_: put_label(c, f"image={PICTURE}&tag=/abs/path", label())),
        ("image id `../outside/x.png` (infer)", "404", lambda c, **_: infer(c, "image=../outside/x.png&output=json", good_box)),
        ("image id `/etc/passwd` (infer)", "404", lambda c, **_: infer(c, "image=/etc/passwd&output=json", good_box)),
        ("image id `%2Fetc%2Fpasswd` (label save)", "404", lambda c, **_: put_label(c, "image=%2Fetc%2Fpasswd&tag=final", label())),
        ("new image id `../escaped` (upload)", "400", lambda c, **_: answer(c.put("/datastore/image?image=../escaped", files={"file": ("x.png", picture())}))),
        ("box wholly outside the image", "400", lambda c, **_: infer(c, f"image={PICTURE}&output=json", {"box": [500, 500, 600, 600]})),
        ("zero-area box", "400", lambda c, **_: infer(c, f"image={PICTURE}&output=json", {"box": [10, 10, 10, 50]})),
        ("box with NaN coordinates", "400", lambda c, **_: infer(c, f"image={PICTURE}&output=json", '{"box": [NaN, 10, 60, 50]}')),
        ("wrong-channel picture (grey + alpha)", "400", lambda c, **_: infer(c, "output=json", good_box, file=("la.png", two_channel_picture()))),
        ("corrupt picture (infer upload)", "400", lambda c, **_: infer(c, "output=json", good_box, file=("broken.png", b"\x89PNG garbage"))),
        ("corrupt picture (datastore upload)", "400", lambda c, **_: answer(c.put("/datastore/image?image=noise", files={"file": ("noise.png", os.urandom(1 << 20))}))),
        ("decompression bomb (60000 x 60000 PNG header)", "400", lambda c, **_: infer(c, "output=json", good_box, file=("bomb.png", forged_png(60_000, 60_000)))),
        ("label of the wrong shape (10 x 10)", "400", lambda c, **_: put_label(c, f"image={PICTURE}&tag=final", png_bytes(np.zeros((10, 10), np.uint8)))),
        ("label with values 0/255", "400", lambda c, **_: put_label(c, f"image={PICTURE}&tag=final", label(value=255))),
        ("params not JSON", "400", lambda c, **_: infer(c, f"image={PICTURE}&output=json", "{not json")),
        ("params nested 100,000 deep", "400", lambda c, **_: infer(c, f"image={PICTURE}&output=json", "[" * 100_000 + "]" * 100_000)),
        ("declared 2 GiB body (Content-Length)", "413", declared_2_gib),
        ("chunked body over the limit", "413", chunked_over_limit),
        ("slow request head (a byte / 0.1 s)", "closed", slow_head),
        ("bad /train body (max_epochs -1)", "400", lambda c, **_: answer(c.post("/train/imedsam?run_sync=true", json={"max_epochs": -1}))),
        ("bad /train body (name `../../x`)", "400", lambda c, **_: answer(c.post("/train/imedsam?run_sync=true", json={"name": "../../x"}))),
        ("corrupt checkpoint upload", "400", lambda c, **_: answer(c.put("/model/imedsam", files={"file": ("model.pt", b"\x80\x02garbage")}))),
        ("NaN voxel on the prompted slice", "400",
         lambda c, **_: infer(c, f"image={VOLUME_ID}&output=json", {"box": [2, 2, 30, 25], "slice": NAN_VOXEL[2]})),
        ("unknown model", "404", lambda c, **_: answer(c.post(f"/infer/nothing?image={PICTURE}", data={"params": json.dumps(good_box)}))),
        ("a good prompt afterwards", "200", lambda c, **_: infer(c, f"image={PICTURE}&output=json", good_box)),
        ("`/info/` afterwards", "200", lambda c, **_: answer(c.get("/info/"))),
    ]  # fmt: skip


def first_words(text: str, words: int = 9, characters: int = 80) -> str:
    parts = " ".join(text.split()).split(" ")
    short = " ".join(parts[:words])
    return (short[:characters] + " …") if len(short) > characters or len(parts) > words else short


def run(client: httpx.Client, pid: int | None, limit_mb: float, header_timeout: float, chosen=cases) -> bool:
    context = {"port": client.base_url.port, "limit_mb": limit_mb, "header_timeout": header_timeout}
    print("| case | expected | observed | pass | peak RSS above idle (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    failed = 0
    for name, expected, case in chosen():
        with PeakRSS(pid) as memory:
            try:
                status, detail = case(client, **context)
            except Exception as exc:  # a case that could not complete is a failure, reported in the table
                status, detail = "error", f"{type(exc).__name__}: {exc}"
        # an answer that names a file in the server's upload folders tells a client where the server keeps files
        ok = status == expected and "/uploads/" not in detail
        failed += not ok
        observed = f"{status}: {first_words(detail)}".replace("|", "\\|")
        memory_mib = "n/a" if memory.above_idle is None else f"{memory.above_idle / (1 << 20):.1f}"
        print(f"| {name} | {expected} | {observed} | {'pass' if ok else '**FAIL**'} | {memory_mib} |", flush=True)
    print(f"\n{len(chosen()) - failed} of {len(chosen())} cases passed.")
    return failed == 0


@contextmanager
def own_server(workdir: Path, max_request_mb: float | None = MAX_REQUEST_MB):
    """serve.py on a copy of the app, with an empty studies folder, on 127.0.0.1; stopped on exit."""
    app_dir, studies = workdir / "app", workdir / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "uploads", "__pycache__"))
    studies.mkdir()
    launcher = [sys.executable, str(app_dir / "serve.py"), "--header_timeout", str(HEADER_TIMEOUT)]
    with label_server(app_dir, studies, workdir, conf(max_request_mb), launcher=launcher, request_timeout=900) as client:
        yield client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (127.0.0.1); by default the script starts its own")
    parser.add_argument("--pid", type=int, help="the server's process, for its memory (found from the port if psutil is installed)")
    parser.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_MB, help="the server's --conf max_request_mb")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, help="the server's serve.py --header_timeout")
    parser.add_argument("--largest", action="store_true", help="the largest inputs the default limits accept, instead")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imedsam-hostile-"))
    if args.largest:
        try:
            serving = nullcontext(httpx.Client(base_url=args.url, timeout=900)) if args.url else own_server(workdir, None)
            with serving as client:
                pid = args.pid or (listening_pid(client.base_url.port) if args.url else client.server.pid)
                try:
                    return 0 if run(client, pid, args.max_request_mb, args.header_timeout, largest_cases) else 1
                finally:
                    client.delete("/datastore/image?id=largest_volume")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        serving = nullcontext(httpx.Client(base_url=args.url, timeout=120)) if args.url else own_server(workdir)
        with serving as client:
            pid = args.pid or (listening_pid(client.base_url.port) if args.url else client.server.pid)
            for query, name, content in [(f"image={PICTURE}", "picture.png", picture()), (f"image={VOLUME_ID}", "volume.nii.gz", nan_volume())]:
                response = client.put(f"/datastore/image?{query}", files={"file": (name, content)})
                if response.status_code != 200:
                    raise SystemExit(f"could not upload the test {name}: {response.status_code} {response.text}")
            try:
                passed = run(client, pid, args.max_request_mb, args.header_timeout)
            finally:
                for image_id in (PICTURE, VOLUME_ID):
                    client.delete(f"/datastore/image?id={image_id}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
