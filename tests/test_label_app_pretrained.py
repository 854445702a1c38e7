"""The MONAI Label app as a user first starts it: no ``--conf`` at all, real polyp images, a box, a mask.

The server serves the pretrained ``lite_medsam`` start; it runs on 127.0.0.1 from a temporary copy of the
project's app (beside a link to the project's bundle, where the app looks by default) and is stopped at the
end. The studies are copies, in a temporary folder, of a few Kvasir-Sessile test images from ../shared/data.
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from imedsam.data import polyp_datalist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KVASIR = ROOT.parent / "shared" / "data" / "kvasir_sessile"
SPLIT = ROOT.parent / "shared" / "data" / "splits" / "kvasir_sessile_split.json"
IMAGES = 3

pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason="../shared/data/kvasir_sessile is not beside the project")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label_pretrained")
    project = tmp / "project"
    shutil.copytree(ROOT / "apps" / "imedsam_label", project / "apps" / "imedsam_label",
                    ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))  # fmt: skip
    os.symlink(ROOT / "bundle", project / "bundle")
    studies = tmp / "studies"
    studies.mkdir()
    masks = {}
    for item in polyp_datalist(str(KVASIR), "test", str(SPLIT))[:IMAGES]:
        name = Path(item["image"]).stem
        shutil.copy(item["image"], studies / Path(item["image"]).name)
        masks[name] = np.asarray(Image.open(item["label"]).convert("L")) > 127

    port = _free_port()
    env = dict(
        os.environ,
        MONAILABEL_PYEXE=sys.executable,
        MONAI_LABEL_TRACKING_ENABLED="false",
        MONAI_LABEL_AUTO_UPDATE_SCORING="false",
        MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    command = [
        str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(project / "apps" / "imedsam_label"),
        "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log_path = tmp / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    try:
        for _ in range(360):  # bounded: 180 s
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if client.get("/info/").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not answer /info/ within 180 s")
        yield {"client": client, "masks": masks, "log": log_path}
    finally:
        client.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def test_default_server_serves_the_pretrained_model_without_an_untrained_warning(server):
    info = server["client"].get("/info/").json()
    assert "imedsam" in info["models"]
    log = server["log"].read_text()
    assert "UNTRAINED" not in log and "pretrained lite_medsam start" in log


def test_a_box_on_a_real_polyp_gives_a_mask_better_than_the_box(server):
    client = server["client"]
    dice = {}
    for name, truth in server["masks"].items():
        ys, xs = np.nonzero(truth)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        response = client.post(f"/infer/imedsam?image={name}&output=image", data={"params": json.dumps({"box": box})})
        assert response.status_code == 200, response.text
        mask = np.asarray(Image.open(io.BytesIO(response.content))) > 0
        assert mask.shape == truth.shape
        dice[name] = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    assert min(dice.values()) >= 0.8, dice
