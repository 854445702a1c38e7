"""The MONAI Label app through a real ``monailabel start_server`` on 127.0.0.1, over HTTP.

The server runs the untrained ``vit_tiny`` at ``image_size`` 64 on a temporary copy of the app and a
temporary studies folder of generated pictures and one NIfTI volume; it is stopped at the end.
"""

import base64
import io
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
nib = pytest.importorskip("nibabel")
from PIL import Image  # noqa: E402

from imedsam.data import synthetic_polyp  # noqa: E402
from imedsam.evaluation import BundleRunner  # noqa: E402
from label_server import label_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    app_dir = tmp / "app"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    studies, masks = tmp / "studies", tmp / "masks"
    studies.mkdir()
    masks.mkdir()
    for i in range(5):
        image, mask = synthetic_polyp((72, 96), seed=i)
        Image.fromarray(image).save(studies / f"img_{i}.png")
        Image.fromarray((mask > 0).astype(np.uint8)).save(masks / f"img_{i}.png")  # labels as MONAI Label stores them: 0/1
    volume = np.random.default_rng(0).normal(0, 100, (40, 32, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), studies / "vol_0.nii.gz")

    conf = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", str(IMAGE_SIZE),
            "--conf", "label", "polyp"]  # fmt: skip
    with label_server(app_dir, studies, tmp, conf) as client:
        yield {"client": client, "app_dir": app_dir, "masks": masks, "studies": studies, "volume": volume}


def infer(client, image, params, output="json", **files):
    return client.post(f"/infer/imedsam?image={image}&output={output}", data={"params": json.dumps(params)}, files=files or None)


def direct_prediction(image_path: Path, box, checkpoint=None) -> np.ndarray:
    """What the package predicts for the same picture and box, outside the server (H x W mask)."""
    import torch
    from monai.bundle import ConfigParser

    from imedsam.inference import Predictor

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"encoder": "vit_tiny", "image_size": IMAGE_SIZE, "sam_checkpoint": None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the app's default seed for untrained weights
        network = parser.get_parsed_content("network_def")
    if checkpoint is not None:
        network.load_checkpoint(checkpoint)
    predictor = Predictor(network)
    predictor.set_image(np.asarray(Image.open(image_path).convert("RGB")))
    probability, _ = predictor.predict(box)
    return probability > 0.5


def test_info_lists_infer_scoring_strategy_and_trainer(server):
    info = server["client"].get("/info/").json()
    model = info["models"]["imedsam"]
    assert model["type"] == "deepgrow" and model["dimension"] == 2 and model["labels"] == {"polyp": 1}
    assert info["labels"] == ["polyp"]  # a list, as OHIF's MONAI Label panel reads it
    assert "ugs" in info["scoring"] and "ugs" in info["strategies"] and "imedsam" in info["trainers"]
    assert info["datastore"]["total"] == 6


def test_slicer_roi_gives_the_packages_mask_at_full_size(server):
    client = server["client"]
    # Slicer's per-axis pairs, unsorted: i in 20..60, j in 10..50
    response = infer(client, "img_3", {"roi": [60, 20, 50, 10, 0, 0]}, output="image")
    assert response.status_code == 200, response.text
    mask = np.asarray(Image.open(io.BytesIO(response.content)))
    assert mask.shape == (72, 96)
    expected = direct_prediction(server["studies"] / "img_3.png", [20, 10, 61, 51])
    np.testing.assert_array_equal(mask > 0, expected)

    clicks = infer(client, "img_3", {"foreground": [[20, 10, 0], [60, 50, 0]], "uncertainty": True}).json()
    assert clicks["box"] == [20, 10, 61, 51] and clicks["box_source"] == "clicks"
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(clicks["uncertainty"]["map_png"]))))
    assert heat.shape == (72, 96) and heat.max() == 255 and clicks["uncertainty"]["max"] > 0


def test_second_prompt_on_an_image_skips_the_encoder(server):
    client = server["client"]
    first = infer(client, "img_2", {"box": [10, 10, 50, 40]}).json()
    second = infer(client, "img_2", {"box": [30, 20, 80, 60]}).json()
    assert first["encoder_cached"] is False and second["encoder_cached"] is True
    logger.warning(
        "re-prompt latency: first prompt %.3f s (encoder %.3f s), second %.3f s (encoder cached)",
        first["latencies"]["infer"], first["encoder_s"], second["latencies"]["infer"],
    )  # fmt: skip


def served_network():
    """The network the test server serves before any training: untrained vit_tiny built from the bundle, seed 0."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"encoder": "vit_tiny", "image_size": IMAGE_SIZE, "sam_checkpoint": None, "decode_mode": "adaptive"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the app's default seed for untrained weights
        return parser.get_parsed_content("network_def")


def test_volume_slice_result_is_the_full_volume_with_one_slice(server, tmp_path):
    from imedsam.inference import Predictor

    response = infer(server["client"], "vol_0", {"roi": [5, 30, 4, 25, 3, 3], "window": [-200, 200]}, output="image")
    assert response.status_code == 200, response.text
    path = tmp_path / "result.nii.gz"
    path.write_bytes(response.content)
    result = np.asarray(nib.load(path).dataobj)
    assert result.shape == server["volume"].shape
    assert result[..., [0, 1, 2, 4, 5]].sum() == 0
    # slice 3 as a picture, stated here: rows are j, columns i, the window mapped to [0, 1], grey to RGB
    picture = np.clip((server["volume"][:, :, 3].swapaxes(0, 1) + 200) / 400, 0, 1)
    predictor = Predictor(served_network())
    predictor.set_image(np.repeat(picture[..., None], 3, axis=-1))
    expected = predictor.predict([5, 4, 31, 26]).probability > 0.5  # Slicer's inclusive roi, as a box
    assert expected.any(), "the served model found nothing in the box: the comparison below would prove nothing"
    np.testing.assert_array_equal(result[..., 3] > 0, expected.swapaxes(0, 1))


def infer_3d(client, image, params, output="json"):
    return client.post(f"/infer/imedsam_3d?image={image}&output={output}", data={"params": json.dumps(params)})


def test_3d_task_returns_the_packages_volume_for_a_slicer_roi(server, tmp_path):
    from imedsam.inference import VolumePredictor, box3d_prompt

    info = server["client"].get("/info/").json()["models"]["imedsam_3d"]
    assert info["dimension"] == 3 and info["type"] == "deepgrow"
    # Slicer's interleaved pairs, unsorted: i 5..30, j 4..25, k 1..4
    params = {"roi": [30, 5, 25, 4, 4, 1], "window": [-200, 200], "result_extension": ".nrrd"}
    response = infer_3d(server["client"], "vol_0", params, output="image")
    assert response.status_code == 200, response.text
    assert response.content[:4] == b"NRRD"
    path = tmp_path / "result.nrrd"
    path.write_bytes(response.content)
    from imedsam.inference import load_image_array

    result = np.asarray(load_image_array(str(path)))
    assert result.shape == server["volume"].shape
    session = VolumePredictor(served_network())
    session.set_volume(server["volume"], window=[-200, 200])
    expected = session.predict([box3d_prompt([5, 4, 1, 31, 26, 5], server["volume"].shape)]).labels
    np.testing.assert_array_equal(result, expected)

    first = infer_3d(server["client"], "vol_0", {"box3d": [[5, 4, 1, 31, 26, 5], [0, 0, 1, 10, 10, 3]], "window": [-200, 200],
                                                  "uncertainty": True}).json()  # fmt: skip
    assert first["encoder_slices"] == 0  # every slice was encoded for the roi request: the cache is the task's
    assert [o["slices"] for o in first["objects"]] == [[1, 4], [1, 2]] and "mean_in_prediction" in first["objects"][0]["uncertainty"]
    clicks = infer_3d(server["client"], "vol_0", {"foreground": [[5, 4, 2], [30, 25, 2]], "window": [-200, 200]}).json()
    assert clicks["objects"][0]["source"] == "clicks" and clicks["objects"][0]["seed_slice"] == 2
    # one click is a click: it reaches the prompt encoder, with the seed slice's background clicks
    one = infer_3d(server["client"], "vol_0", {"foreground": [[16, 14, 3]], "background": [[1, 1, 3]], "window": [-200, 200]}).json()
    assert one["objects"][0]["source"] == "points" and one["objects"][0]["points"] == [[16, 14, 1], [1, 1, 0]]
    assert "box" not in one["objects"][0] and one["objects"][0]["seed_slice"] == 3


@pytest.mark.parametrize(
    "image, params, message",
    [
        ("vol_0", {"roi": [2, 3, 1, 20, 4, 5]}, "roi_layout"),
        ("vol_0", {"roi": [2, 3, 1, 10, 12, 5], "roi_layout": "slicer"}, "outside the volume"),
        ("vol_0", {"box": [1, 1, 9, 9]}, "needs 'slice'"),
        ("vol_0", {"foreground": [[1, 1, 1]], "clicks": "corners"}, "one foreground click"),
        ("vol_0", {"foreground": [[1, 1, 1]], "clicks": "all"}, "clicks must be one of auto, points, corners"),
        ("img_1", {"box3d": [1, 1, 0, 9, 9, 1]}, "2D picture"),
        ("vol_0", {"box3d": [1, 1, 0, 9, 9, 2], "modality": "XYZ"}, "unknown modality 'XYZ'; accepted: ct, mr"),
    ],
)
def test_3d_task_bad_requests_get_a_400_naming_the_problem(server, image, params, message):
    response = infer_3d(server["client"], image, params)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


@pytest.mark.parametrize(
    "image, params, status, message",
    [
        ("no_such_image", {"box": [1, 1, 9, 9]}, 404, "not in the datastore"),
        ("img_1", {"roi": [200, 260, 10, 50, 0, 0]}, 400, "outside the image"),
        ("img_1", {"roi": [1, 2, 3]}, 400, "6 values"),
        ("img_1", {"roi": "abc"}, 400, "list of numbers"),
        ("img_1", {"box": [5, 5, 5, 20]}, 400, "zero area"),
        ("img_1", {}, 400, "no box prompt"),
        ("vol_0", {"box": [1, 1, 9, 9]}, 400, "say which"),
        ("img_1", {"box": [5, 5, 40, 40], "modality": "bogus"}, 400, "unknown modality 'bogus'; accepted: ct, mr"),
        ("img_1", {"box": [5, 5, 40, 40], "modality": ["CT"]}, 400, "modality must be a string"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, image, params, status, message):
    response = infer(server["client"], image, params)
    assert response.status_code == status and message in response.json()["detail"]
    assert server["client"].get("/info/").status_code == 200


def test_the_modality_is_the_requests_else_the_images_info(server):
    client, box = server["client"], {"box": [10, 10, 50, 40]}
    assert infer(client, "img_2", box).json()["modality"] is None  # no request field, no info, no --conf modality
    assert infer(client, "img_2", {**box, "modality": "MR"}).json()["modality"] == "mr"
    # the DICOM tag, as MONAI Label's DICOMweb datastore records it in the image's info
    stored = client.put("/datastore/image/info?image=img_2", data={"info": json.dumps({"Modality": "US"})})
    assert stored.status_code == 200, stored.text
    assert infer(client, "img_2", box).json()["modality"] == "us"
    assert infer(client, "img_2", {**box, "modality": "dx"}).json()["modality"] == "xray"
    assert infer_3d(client, "vol_0", {"box3d": [2, 2, 1, 20, 20, 4], "modality": "PT"}).json()["modality"] == "pet"


def test_corrupt_upload_is_a_400(server):
    response = server["client"].post(
        "/infer/imedsam?output=json", data={"params": json.dumps({"box": [0, 0, 4, 4]})}, files={"file": ("x.png", b"garbage")}
    )
    assert response.status_code == 400 and "could not read image" in response.json()["detail"]
    assert infer(server["client"], "img_1", {"box": [10, 10, 50, 40]}).status_code == 200


def test_labels_scoring_active_learning_and_retraining(server, tmp_path):
    client, masks = server["client"], server["masks"]
    for count, image_id in enumerate(("img_0", "img_1"), start=1):
        with open(masks / f"{image_id}.png", "rb") as f:
            saved = client.put(f"/datastore/label?image={image_id}&tag=final", files={"label": (f"{image_id}.png", f)})
        assert saved.status_code == 200, saved.text
        if count == 1:  # one label cannot make a train and a validation set
            refused = client.post("/train/imedsam?run_sync=true", json={"max_epochs": 1})
            assert refused.status_code == 400 and "at least 2 labeled images" in refused.json()["detail"]
    assert client.get("/datastore/?output=stats").json()["label_tags"] == {"final": 2}

    scores = client.post("/scoring/ugs?run_sync=true").json()
    assert set(scores["scored"]) == {"img_2", "img_3", "img_4", "vol_0"} and scores["model"] == "untrained"
    assert all(value > 0 for value in scores["scored"].values())
    info = client.get("/datastore/image/info?image=img_3").json()
    assert info["ugs_box_source"] == "last_prompt" and info["ugs_box"] == [20, 10, 61, 51]
    unprompted = client.get("/datastore/image/info?image=img_4").json()
    assert unprompted["ugs_box"] == [0, 0, 96, 72] and unprompted["ugs_box_source"] == "whole_image"  # the head is untrained
    again = client.post("/scoring/ugs?run_sync=true").json()
    assert again["scored"] == {} and again["up_to_date"] == 4  # nothing changed: nothing recomputed

    chosen = client.post("/activelearning/ugs", json={}).json()
    assert chosen["id"] == max(scores["scored"], key=scores["scored"].get) and chosen["stale"] is False

    settings = {"max_epochs": 1, "train_label_size": 32, "train_query_size": 16, "label_size": 32}
    stats = client.post("/train/imedsam?run_sync=true", json=settings).json()
    assert stats["train_samples"] + stats["val_samples"] == 2
    published = server["app_dir"] / "model" / "imedsam.pt"
    assert published.is_file()
    # the reported Dice is the published model's on the exported validation image, as the bundle evaluates it
    exported = server["app_dir"] / "model" / "imedsam" / "train_01" / "data"
    split = json.loads((exported / "split.json").read_text())
    (tmp_path / "val_as_test.json").write_text(json.dumps({**split, "test": split["val"]}))
    runner = BundleRunner(str(ROOT / "bundle"), str(exported), {"encoder": "vit_tiny", "image_size": IMAGE_SIZE, "label_size": 32})
    summary = runner.evaluate(str(published), str(tmp_path / "val_as_test.json"), str(tmp_path / "val_eval"))
    assert summary["count"] == 1 and stats["best_val_dice"] == pytest.approx(summary["dice"]["mean"], abs=6e-5)
    assert client.get("/info/").json()["train_stats"]["imedsam"]["best_val_dice"] == stats["best_val_dice"]

    after = infer(client, "img_3", {"roi": [60, 20, 50, 10, 0, 0]}, output="image")
    mask = np.asarray(Image.open(io.BytesIO(after.content)))
    np.testing.assert_array_equal(mask > 0, direct_prediction(server["studies"] / "img_3.png", [20, 10, 61, 51], published))
    rescored = client.post("/scoring/ugs?run_sync=true").json()
    assert rescored["model"].startswith("imedsam.pt@") and set(rescored["scored"]) == {"img_2", "img_3", "img_4", "vol_0"}
    # training trained the box-proposal head too: an image nobody prompted is now scored in the box it proposes
    unprompted = client.get("/datastore/image/info?image=img_4").json()
    assert unprompted["ugs_box_source"] == "proposed_box" and 0 <= unprompted["ugs_box_confidence"] <= 1
    x0, y0, x1, y1 = unprompted["ugs_box"]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 72


def _trainers_module(app_dir):
    from importlib import import_module

    sys.path.insert(0, str(app_dir))
    try:
        return import_module("lib.trainers.imedsam")
    finally:
        sys.path.remove(str(app_dir))


def test_training_set_export_checks_labels_and_slices_volumes(server, tmp_path):
    trainers = _trainers_module(server["app_dir"])
    image = server["studies"] / "img_4.png"
    empty, wrong = tmp_path / "empty.png", tmp_path / "wrong.png"
    Image.fromarray(np.zeros((72, 96), np.uint8)).save(empty)
    Image.fromarray(np.ones((10, 10), np.uint8)).save(wrong)
    with pytest.raises(trainers.TrainingDataError, match="at least 2 labeled images"):
        trainers.export_training_set([{"image": str(image), "label": str(empty)}], str(tmp_path / "a"), 0.2, 0)
    with pytest.raises(trainers.TrainingDataError, match="does not match its image"):
        trainers.export_training_set([{"image": str(image), "label": str(wrong)}], str(tmp_path / "b"), 0.2, 0)

    # a volume gives one pair per labeled slice; a single volume is split by slices
    label = np.zeros(server["volume"].shape, np.uint8)
    label[5:20, 4:12, 1] = 1
    label[8:30, 10:25, 4] = 1
    label_path = tmp_path / "vol_0.nii.gz"
    nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.8, 2.5, 1.0])), label_path)
    out = tmp_path / "c"
    split = trainers.export_training_set(
        [{"image": str(server["studies"] / "vol_0.nii.gz"), "label": str(label_path)}], str(out), 0.5, 0, [-200, 200]
    )
    assert sorted(split["train"] + split["val"]) == ["vol_0_slice0001", "vol_0_slice0004"] and len(split["val"]) == 1
    mask = np.asarray(Image.open(out / "masks" / "vol_0_slice0004.png"))
    expected = np.zeros((32, 40), bool)  # the slice as a picture: rows are j, columns i
    expected[10:25, 8:30] = True
    np.testing.assert_array_equal(mask > 127, expected)
    picture = np.asarray(Image.open(out / "images" / "vol_0_slice0004.png"))
    assert picture.shape == (32, 40, 3)


def test_a_served_slab_model_with_click_lora_answers_3d_boxes_and_one_click(tmp_path):
    """The model of the 3DSAM-adapter study as a user serves it: volumetric adapters (slabs of 3) and LoRA in the
    two-way transformer, from a checkpoint given with --conf; a 3D box and a single click each give a 3D mask."""
    import torch

    from imedsam.networks import build_imedsam

    app_dir, studies = tmp_path / "app", tmp_path / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    studies.mkdir()
    volume = np.random.default_rng(1).normal(0, 100, (40, 32, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.5, 1.0])), studies / "vol_0.nii.gz")
    options = {"volumetric_adapter": True, "slab_depth": 3, "decoder_lora_rank": 2}
    checkpoint = tmp_path / "slab_clicks.pt"
    torch.save(build_imedsam("vit_tiny", image_size=IMAGE_SIZE, **options).state_dict(), checkpoint)
    conf = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", str(IMAGE_SIZE),
            "--conf", "model_checkpoint", str(checkpoint), "--conf", "volumetric_adapter", "true", "--conf", "slab_depth", "3",
            "--conf", "decoder_lora_rank", "2"]  # fmt: skip
    with label_server(app_dir, studies, tmp_path, conf) as client:
        boxed = infer_3d(client, "vol_0", {"box3d": [5, 4, 1, 31, 26, 5], "window": [-200, 200]})
        assert boxed.status_code == 200, boxed.text
        # slices 1..4 lie in the slabs [0, 3) and [3, 6): the encoder ran on all six, a slab at a time
        assert boxed.json()["encoder_slices"] == 6 and boxed.json()["objects"][0]["slices"] == [1, 4]
        clicked = infer_3d(client, "vol_0", {"foreground": [[16, 14, 2]], "window": [-200, 200]})
        assert clicked.status_code == 200, clicked.text
        assert clicked.json()["objects"][0]["source"] == "points" and clicked.json()["objects"][0]["seed_slice"] == 2
