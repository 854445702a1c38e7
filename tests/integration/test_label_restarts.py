"""The label server across restarts: a torn datastore record, and kill -9 while labels are being saved."""

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

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from imedsam.data import synthetic_polyp  # noqa: E402
from label_server import label_server  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: started first by tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (48, 64)
# each kill at a random moment of a save loop; a restart (about 10 s) follows each, so more kills cost minutes
KILLS = 5
CONF = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", "64"]


def _workspace(root: Path, images: int) -> tuple[Path, Path]:
    app_dir, studies = root / "app", root / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    studies.mkdir()
    for i in range(images):
        Image.fromarray(synthetic_polyp(SHAPE, seed=i)[0]).save(studies / f"img_{i}.png")
    return app_dir, studies


def _label(seed: int) -> np.ndarray:
    """A 0/1 label whose rectangle depends on ``seed``, so that two saves can be told apart."""
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, SHAPE[0] // 2), rng.integers(0, SHAPE[1] // 2)
    label = np.zeros(SHAPE, np.uint8)
    label[y0 : y0 + rng.integers(4, SHAPE[0] // 2), x0 : x0 + rng.integers(4, SHAPE[1] // 2)] = 1
    return label


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _save(client, image_id: str, label: np.ndarray):
    return client.put(f"/datastore/label?image={image_id}&tag=final", files={"label": ("label.png", _png(label))})


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_torn_datastore_record_is_recovered_at_start_and_no_label_is_lost(tmp_path, damage):
    app_dir, studies = _workspace(tmp_path, 3)
    with label_server(app_dir, studies, tmp_path, CONF) as client:
        assert _save(client, "img_1", _label(1)).status_code == 200
    record = studies / "datastore_v2.json"
    content = record.read_bytes()
    record.write_bytes(content[: len(content) // 2] if damage == "cut" else b"")
    with label_server(app_dir, studies, tmp_path, CONF) as client:
        assert client.get("/info/").status_code == 200
        assert client.get("/datastore/?output=stats").json()["label_tags"] == {"final": 1}
        stored = client.get("/datastore/label?label=img_1&tag=final")
        assert stored.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), _label(1))
    log = (tmp_path / "server.log").read_text()
    assert "is unreadable" in log and "rebuilding the record from the studies folder" in log
    assert len(list(studies.glob("datastore_v2.json.torn-*"))) == 1
    json.loads(record.read_text())  # rewritten whole


def test_an_infer_does_not_rewrite_the_datastore_record(tmp_path):
    app_dir, studies = _workspace(tmp_path, 2)
    with label_server(app_dir, studies, tmp_path, CONF) as client:
        before = (studies / "datastore_v2.json").stat().st_mtime_ns
        response = client.post("/infer/imedsam?image=img_0&output=json", data={"params": json.dumps({"box": [5, 5, 40, 30]})})
        assert response.status_code == 200, response.text
        assert (studies / "datastore_v2.json").stat().st_mtime_ns == before
        assert json.loads((app_dir / "model" / "last_prompts.json").read_text())["img_0"]["box"] == [5.0, 5.0, 40.0, 30.0]


def test_kill_9_while_saving_labels_loses_no_acknowledged_label(tmp_path):
    app_dir, studies = _workspace(tmp_path, 4)
    rng = random.Random(0)
    acknowledged: dict[str, int] = {}  # image -> seed of its last label answered with 200
    attempted_after: dict[str, list[int]] = {}  # image -> seeds sent after that answer (they may have landed)
    seed = 0
    for round_index in range(KILLS + 1):  # each kill followed by a restart that checks
        with label_server(app_dir, studies, tmp_path, CONF, request_timeout=30) as client:
            # everything acknowledged so far is there and intact, whatever happened to the saves in flight
            for image_id, good in acknowledged.items():
                stored = np.asarray(Image.open(studies / "labels" / "final" / f"{image_id}.png"))
                assert any(np.array_equal(stored, _label(s)) for s in [good, *attempted_after.get(image_id, [])]), image_id
            assert client.get("/datastore/?output=stats").json()["label_tags"].get("final", 0) >= len(acknowledged)
            if round_index == KILLS:
                break

            stop, refused = threading.Event(), []

            def save_in_a_loop(first_seed: int) -> None:
                current = first_seed
                while not stop.is_set():
                    image_id = f"img_{current % 4}"
                    attempted_after.setdefault(image_id, []).append(current)
                    try:
                        response = _save(client, image_id, _label(current))
                    except httpx.TransportError:
                        return  # the server is gone
                    if response.status_code == 200:
                        acknowledged[image_id] = current
                        attempted_after[image_id] = []
                    else:
                        refused.append(response.text)
                        return
                    current += 1

            worker = threading.Thread(target=save_in_a_loop, args=(seed,))
            worker.start()
            time.sleep(rng.uniform(0.2, 2.0))
            os.killpg(client.server.pid, signal.SIGKILL)
            client.server.wait(timeout=30)
            stop.set()
            worker.join(timeout=60)
            assert not worker.is_alive()
            assert not refused, f"round {round_index}: a good label was refused: {refused}"
            seed += 1000
    assert len(acknowledged) == 4  # every image got labels, checked at each restart
