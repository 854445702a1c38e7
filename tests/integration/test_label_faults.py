"""Kill -9 in the middle of label saves and model publishes, then a restart on the same folders (issue 38).

Each round saves labels (``PUT /datastore/label``) and publishes checkpoints (``PUT /model/imedsam``) in two loops
at once and kills the server with SIGKILL: at a seeded random moment, or (every other round) a random few
milliseconds after a staging file of a label or of the checkpoint appears, so that kills land inside the writes
too. It checks the files the kill left before starting the server again: every label file is byte for byte one
that was sent (the last answered 200, or one sent after it), the datastore record is whole JSON of MONAI Label's
model, ``model/imedsam.pt`` and ``imedsam.previous.pt`` are checkpoints that were sent (their hashes). After the
restart: ``/info/`` answers, the labels are served as they are on disk, no staging (``*.tmp``) file or upload
folder is left, and the model served is the file on disk.
"""

import hashlib
import io
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
from monai.bundle import ConfigParser  # noqa: E402
from monailabel.datastore.local import LocalDatastoreModel  # noqa: E402

from conftest import import_app_module  # noqa: E402
from imedsam.data import synthetic_polyp  # noqa: E402
from label_server import label_server  # noqa: E402
from upload_files import png_bytes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (48, 64)
IMAGES = 3
ROUNDS = 6  # each a kill and a restart (a few seconds each with vit_tiny)
# what a round waits for before its kill: None (a random moment), else the staging files of that write
TARGETS = (None, "labels/final/.img_*.tmp", None, "model/.imedsam.pt.*.tmp", None, "model/.imedsam.pt.*.tmp")
NETWORK = {"encoder": "vit_tiny", "image_size": "64"}
CONF = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", "64"]


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _label(seed: int) -> bytes:
    """A 0/1 label PNG whose rectangle depends on ``seed``, so that two saves differ."""
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, SHAPE[0] // 2), rng.integers(0, SHAPE[1] // 2)
    label = np.zeros(SHAPE, np.uint8)
    label[y0 : y0 + rng.integers(4, SHAPE[0] // 2), x0 : x0 + rng.integers(4, SHAPE[1] // 2)] = 1
    return png_bytes(label)


@pytest.fixture(scope="module")
def checkpoints() -> list[bytes]:
    """Three state dicts of the served network (built as the app builds it), each with different bytes."""
    overrides = import_app_module("lib.configs.imedsam").network_overrides(NETWORK)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(ROOT / "bundle"), **overrides, "sam_checkpoint": None})
    state = parser.get_parsed_content("network_def").state_dict()
    made = []
    for scale in (1.0, 0.5, 0.25):
        buffer = io.BytesIO()
        torch.save({k: v * scale if v.is_floating_point() else v for k, v in state.items()}, buffer)
        made.append(buffer.getvalue())
    return made


def _wait_for(folder: Path, pattern: str, timeout_s: float) -> bool:
    """Poll (every 2 ms, at most ``timeout_s``) until a file matching ``pattern`` exists under ``folder``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if next(folder.glob(pattern), None) is not None:
            return True
        time.sleep(0.002)
    return False


def _staging(studies: Path, app_dir: Path) -> list[str]:
    return [str(p) for folder in (studies, app_dir / "model") for p in folder.rglob("*.tmp")]


def _leftovers(studies: Path, app_dir: Path) -> list[str]:
    uploads = app_dir / "uploads"
    return _staging(studies, app_dir) + ([str(p) for p in uploads.iterdir()] if uploads.exists() else [])


def test_kill_9_during_label_saves_and_model_publishes_leaves_old_or_new_files_never_torn(tmp_path, checkpoints):
    app_dir, studies = tmp_path / "app", tmp_path / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "uploads", "__pycache__"))
    studies.mkdir()
    for i in range(IMAGES):
        (studies / f"img_{i}.png").write_bytes(png_bytes(synthetic_polyp(SHAPE, seed=i)[0]))
    hashes = [_sha(c) for c in checkpoints]
    served = app_dir / "model" / "imedsam.pt"
    rng = random.Random(38)
    # image -> label seeds that may be on disk: the last answered 200 and every one sent after it
    labels: dict[str, list[int]] = {}
    models: list[int] = []  # the same for the served checkpoint (indices into checkpoints)
    acknowledged: set[str] = set()
    seed, caught_writing = 0, 0

    for round_index in range(ROUNDS + 1):
        if round_index:  # what the kill left, before a restart touches anything
            record = (studies / "datastore_v2.json").read_text()
            model = LocalDatastoreModel.model_validate_json(record)  # whole, never torn
            for i in range(IMAGES):
                path = studies / "labels" / "final" / f"img_{i}.png"
                if path.exists():
                    assert any(path.read_bytes() == _label(s) for s in labels[f"img_{i}"]), f"round {round_index}: {path.name} is torn"
                    if f"img_{i}" in model.objects and "final" in model.objects[f"img_{i}"].labels:
                        assert model.objects[f"img_{i}"].labels["final"].info["name"] == path.name
                else:
                    assert f"img_{i}" not in acknowledged, f"round {round_index}: img_{i} lost its label"
            if served.exists():
                assert models and _sha(served.read_bytes()) in {hashes[m] for m in models}, f"round {round_index}: imedsam.pt is torn"
            previous = served.with_name("imedsam.previous.pt")
            if previous.exists():
                assert _sha(previous.read_bytes()) in hashes, f"round {round_index}: imedsam.previous.pt is torn"
            caught_writing += bool(_staging(studies, app_dir))

        with label_server(app_dir, studies, tmp_path, CONF, request_timeout=30) as client:
            assert not _leftovers(studies, app_dir), f"round {round_index}: left after the restart: {_leftovers(studies, app_dir)}"
            assert not list(studies.glob("datastore_v2.json.torn-*")), "a restart found the record torn"
            stats = client.get("/datastore/?output=stats").json()
            assert stats["total"] == IMAGES
            for i in range(IMAGES):  # served as stored
                path = studies / "labels" / "final" / f"img_{i}.png"
                answer = client.get(f"/datastore/label?label=img_{i}&tag=final")
                assert answer.status_code == (200 if path.exists() else 404)
                if path.exists():
                    assert answer.content == path.read_bytes()
            if round_index == 0:  # a served checkpoint, so that a publish has an old one to keep or replace
                assert client.put("/model/imedsam", files={"file": ("model.pt", checkpoints[0])}).status_code == 200
                models[:] = [0]
            if round_index == ROUNDS:
                # the model served is the file on disk (its version is the file's name and time), and it loads
                answer = client.post("/infer/imedsam?image=img_0&output=json", data={"params": json.dumps({"box": [5, 5, 40, 30]})})
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == f"imedsam.pt@{served.stat().st_mtime_ns}"
                break

            stop, refused = threading.Event(), []

            def save_labels(first: int) -> None:
                current = first
                while not stop.is_set():
                    image_id = f"img_{current % IMAGES}"
                    labels.setdefault(image_id, []).append(current)
                    try:
                        response = client.put(f"/datastore/label?image={image_id}&tag=final", files={"label": ("label.png", _label(current))})
                    except httpx.TransportError:
                        return  # killed
                    if response.status_code != 200:
                        refused.append(response.text)
                        return
                    labels[image_id] = [current]
                    acknowledged.add(image_id)
                    current += 1

            def publish_models(first: int) -> None:
                current = first
                with httpx.Client(base_url=str(client.base_url), timeout=30) as other:
                    while not stop.is_set():
                        index = current % len(checkpoints)
                        models.append(index)
                        try:
                            response = other.put("/model/imedsam", files={"file": ("model.pt", checkpoints[index])})
                        except httpx.TransportError:
                            return
                        if response.status_code != 200:
                            refused.append(response.text)
                            return
                        models[:] = [index]
                        current += 1

            workers = [threading.Thread(target=save_labels, args=(seed,)), threading.Thread(target=publish_models, args=(round_index + 1,))]
            for worker in workers:
                worker.start()
            delay = rng.uniform(0.3, 3.0)
            if TARGETS[round_index] is None:
                time.sleep(delay)
            elif _wait_for(tmp_path / ("studies" if TARGETS[round_index].startswith("labels") else "app"), TARGETS[round_index], 20):
                time.sleep(delay / 100)  # a few milliseconds into the write
            os.killpg(client.server.pid, signal.SIGKILL)
            client.server.wait(timeout=30)
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
                assert not worker.is_alive()
            assert not refused, f"round {round_index}: a good request was refused: {refused}"
            seed += 1000
    assert len(acknowledged) == IMAGES and models  # every image got labels, and checkpoints were published
    assert caught_writing, "no kill landed in a write: nothing was left for a restart to clean"
