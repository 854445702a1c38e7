"""The MONAI Label app as a user first starts it: no ``--conf`` at all, real polyp images, a box, a mask.

The server serves the pretrained ``lite_medsam`` start; it runs on 127.0.0.1 from a temporary copy of the
project's app (beside a link to the project's bundle, where the app looks by default) and is stopped at the
end. The studies are copies, in a temporary folder, of a few Kvasir-Sessile test images from ../shared/data.
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from imedsam.data import polyp_datalist  # noqa: E402
from label_server import label_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KVASIR = ROOT.parent / "shared" / "data" / "kvasir_sessile"
SPLIT = ROOT.parent / "shared" / "data" / "splits" / "kvasir_sessile_split.json"
IMAGES = 3

pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason="../shared/data/kvasir_sessile is not beside the project")


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

    with label_server(project / "apps" / "imedsam_label", studies, tmp, start_timeout=180, request_timeout=300) as client:
        yield {"client": client, "masks": masks, "log": tmp / "server.log"}


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
