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

from imedsam.data import box_from_mask, polyp_datalist  # noqa: E402
from label_server import label_server  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: started first by tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
KVASIR = ROOT.parent / "shared" / "data" / "kvasir_sessile"
SPLIT = ROOT.parent / "shared" / "data" / "splits" / "kvasir_sessile_split.json"
IMAGES = 3  # held-out test images
TO_LABEL = 4  # train images a user labels before retraining
UNPROMPTED = 1  # a train image nobody prompts or labels: UGS scores it in a box it must find

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
    groups = {"masks": {}, "to_label": {}, "unprompted": {}}
    train = polyp_datalist(str(KVASIR), "train", str(SPLIT))
    picked = {"masks": polyp_datalist(str(KVASIR), "test", str(SPLIT))[:IMAGES], "to_label": train[:TO_LABEL],
              "unprompted": train[TO_LABEL : TO_LABEL + UNPROMPTED]}  # fmt: skip
    for group, items in picked.items():
        for item in items:
            name = Path(item["image"]).stem
            shutil.copy(item["image"], studies / Path(item["image"]).name)
            groups[group][name] = np.asarray(Image.open(item["label"]).convert("L")) > 127

    with label_server(project / "apps" / "imedsam_label", studies, tmp, start_timeout=180, request_timeout=600) as client:
        yield {"client": client, **groups, "log": tmp / "server.log"}


def held_out_dice(client, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """The served model's Dice on each held-out image, prompted with the tight box of its mask."""
    dice = {}
    for name, truth in masks.items():
        response = client.post(f"/infer/imedsam?image={name}&output=image", data={"params": json.dumps({"box": box_from_mask(truth).tolist()})})
        assert response.status_code == 200, response.text
        mask = np.asarray(Image.open(io.BytesIO(response.content))) > 0
        assert mask.shape == truth.shape
        dice[name] = 2 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
    return dice


def test_default_server_serves_the_pretrained_model_without_an_untrained_warning(server):
    info = server["client"].get("/info/").json()
    assert "imedsam" in info["models"]
    log = server["log"].read_text()
    assert "UNTRAINED" not in log and "pretrained lite_medsam start" in log


def test_a_box_on_a_real_polyp_gives_a_mask_better_than_the_box(server):
    dice = held_out_dice(server["client"], server["masks"])
    assert min(dice.values()) >= 0.8, dice


def test_retraining_on_four_labels_keeps_the_held_out_dice_and_learns_to_propose_boxes(server):
    """A user labels four images and retrains with the trainer's defaults: the served model is fine-tuned from
    the pretrained start, the held-out Dice does not drop, and unprompted images are then scored in a box the
    model proposes (before training, its head is untrained and the whole image is the box)."""
    client = server["client"]
    before = held_out_dice(client, server["masks"])
    scores = client.post("/scoring/ugs?run_sync=true").json()
    assert set(scores["scored"]) == set(server["masks"]) | set(server["to_label"]) | set(server["unprompted"])
    for name, truth in server["unprompted"].items():
        info = client.get(f"/datastore/image/info?image={name}").json()
        assert info["ugs_box_source"] == "whole_image" and info["ugs_box"] == [0, 0, truth.shape[1], truth.shape[0]]

    for name, truth in server["to_label"].items():
        buffer = io.BytesIO()
        Image.fromarray(truth.astype(np.uint8)).save(buffer, format="PNG")
        saved = client.put(f"/datastore/label?image={name}&tag=final", files={"label": (f"{name}.png", buffer.getvalue())})
        assert saved.status_code == 200, saved.text
    stats = client.post("/train/imedsam?run_sync=true", json={}).json()
    assert stats["final_labels"] == TO_LABEL and stats["started_from"] is None, stats  # None: the pretrained start
    after = held_out_dice(client, server["masks"])
    print(f"held-out Dice before {np.mean(list(before.values())):.4f}, after {np.mean(list(after.values())):.4f}; training {stats}")
    assert np.mean(list(after.values())) >= np.mean(list(before.values())), (before, after)

    rescored = client.post("/scoring/ugs?run_sync=true").json()
    assert set(rescored["scored"]) == set(server["masks"]) | set(server["unprompted"])
    assert rescored["model"].startswith("imedsam.pt@")
    for name, truth in server["unprompted"].items():
        info = client.get(f"/datastore/image/info?image={name}").json()
        assert info["ugs_box_source"] == "proposed_box" and 0 <= info["ugs_box_confidence"] <= 1
        assert info["ugs_box"] != [0, 0, truth.shape[1], truth.shape[0]]
