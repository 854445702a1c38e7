"""Uploads, saves and full disks against a real MONAI Label server serving the app (127.0.0.1).

Image uploads go through the app's checks, a label save or image upload the disk refuses changes nothing and
answers 507 (503 for other I/O errors) without a server path, a prompt record that cannot be written costs no
mask, and an uploaded checkpoint replaces the served one only once it is checked. Full disks are injected:
``tests/faults/sitecustomize.py`` makes the server's ``fsync`` of chosen files fail with ``ENOSPC`` or ``EIO``.
The same cases in process are in ``test_label_datastore.py``.
"""

import io
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
httpx = pytest.importorskip("httpx")
nib = pytest.importorskip("nibabel")
from monai.bundle import ConfigParser  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import import_app_module  # noqa: E402
from imedsam.data import synthetic_polyp  # noqa: E402
from label_server import label_server  # noqa: E402
from upload_files import forged_nifti, forged_png, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (72, 96)  # height, width of the studies' pictures
VOLUME = (40, 32, 6)
NETWORK = {"encoder": "vit_tiny", "image_size": "64"}
CONF = ["--conf", "bundle", str(ROOT / "bundle"), "--conf", "encoder", "vit_tiny", "--conf", "image_size", "64", "--conf", "label",
        "polyp", "--conf", "max_image_pixels", "4000000", "--conf", "max_image_voxels", "1000000"]  # fmt: skip


def _label(value=1, shape=SHAPE) -> bytes:
    label = np.zeros(shape, np.uint8)
    label[10:30, 20:50] = value
    return png_bytes(label)


def _picture(seed: int, shape=SHAPE) -> bytes:
    return png_bytes(synthetic_polyp(shape, seed=seed)[0])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    app_dir, studies = root / "app", root / "studies"
    shutil.copytree(ROOT / "apps" / "imedsam_label", app_dir, ignore=shutil.ignore_patterns("model", "logs", "bin", "uploads", "__pycache__"))
    studies.mkdir()
    for i in range(4):
        (studies / f"img_{i}.png").write_bytes(_picture(i))
    nib.save(nib.Nifti1Image(np.zeros(VOLUME, np.int16), np.eye(4)), studies / "vol_0.nii.gz")
    control = root / "faults.json"
    control.write_text("{}")
    with pytest.MonkeyPatch.context() as patch:  # the server imports tests/faults/sitecustomize.py
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH", "")]))
        with label_server(app_dir, studies, root, CONF, env={"IMEDSAM_TEST_FAULTS": str(control)}) as client:
            yield {"client": client, "root": root, "studies": studies, "app_dir": app_dir, "control": control}


@contextmanager
def faults(server, rules: dict[str, str]):
    """While the block runs, the server's fsync of a file matching a pattern fails with the errno named."""
    server["control"].write_text(json.dumps(rules))
    try:
        yield
    finally:
        server["control"].write_text("{}")


def _record(server) -> dict:
    return server["client"].get("/datastore/?output=all").json()


def _assert_no_server_path(server, text: str) -> None:
    for path in (str(server["root"]), str(ROOT), "/tmp/", "uploads"):
        assert path not in text, f"the answer names a server path ({path}): {text}"


@pytest.fixture
def clean(server):
    """Assert after the test: no upload, staging or temporary file is left, and the server answers."""
    root = server["root"]
    tmp_before = set(os.listdir(root / "tmp"))
    yield
    deadline = time.monotonic() + 5  # a result file is removed by a background task just after its answer
    while set(os.listdir(root / "tmp")) - tmp_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(os.listdir(root / "tmp")) - tmp_before, "temporary files left behind"
    uploads = server["app_dir"] / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir()), "uploads left behind"

    def staging():
        return [p.name for folder in (server["studies"], server["app_dir"] / "model") for p in folder.rglob("*.tmp")]

    # the datastore's own refresh may be writing its record (atomically, through a staging file) right now
    while staging() and time.monotonic() < deadline + 5:
        time.sleep(0.1)
    assert not staging(), f"staging files left behind: {staging()}"
    assert server["client"].get("/info/").status_code == 200


def _put_image(client, query: str, content: bytes, name: str = "image.png"):
    return client.put(f"/datastore/image?{query}", files={"file": (name, content)})


def _put_label(client, image: str, content: bytes, name: str = "label.png"):
    return client.put(f"/datastore/label?image={image}&tag=final", files={"label": (name, content)})


# -- item 2: image uploads ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query, name, content, message",
    [
        ("image=img_new", "noise.png", "NOISE", "the image cannot be stored: could not read noise.png"),
        ("image=img_new", "bomb.png", forged_png(60_000, 60_000), "bomb.png is too large to decode"),
        ("image=img_new", "big.png", forged_png(2500, 2000), "above the limit of 4,000,000 pixels"),
        ("image=img_new", "huge.nii.gz", forged_nifti((2000, 2000, 1000)), "4,000,000,000 voxels, above the limit of 1,000,000"),
        ("image=img_new", "cut.nii.gz", forged_nifti(VOLUME, b"\0" * 100), "cut.nii.gz is cut short"),
        ("image=img_new", "empty.png", b"", "the image file is empty"),
        ("image=img_new", "image.exe", b"MZ", "is not one of"),
        ("", "bad name.png", "GOOD", "image id 'bad name' is not a plain name"),
        ("image=../escaped", "good.png", "GOOD", "image id '../escaped' is not a plain name"),
    ],
)
def test_a_bad_image_upload_is_a_400_and_nothing_is_stored(server, clean, query, name, content, message):
    content = {"NOISE": np.random.default_rng(0).bytes(5 << 20), "GOOD": _picture(7)}.get(content, content)
    studies_before, record_before = sorted(os.listdir(server["studies"])), _record(server)
    response = _put_image(server["client"], query, content, name)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    _assert_no_server_path(server, response.text)
    assert sorted(os.listdir(server["studies"])) == studies_before and _record(server) == record_before


def test_a_good_image_is_stored_and_listed(server, clean):
    client = server["client"]
    content = _picture(11)
    assert _put_image(client, "image=img_new", content).json() == {"image": "img_new"}
    assert client.get("/datastore/image?image=img_new").content == content
    # MONAI Label's older route, and the id taken from the file's name
    response = client.put("/datastore/", files={"file": ("named_7.png", _picture(12))})
    assert response.status_code == 200 and response.json() == {"image": "named_7"}
    volume = io.BytesIO()
    volume.write(forged_nifti(VOLUME, b"\0" * (2 * np.prod(VOLUME))))
    assert _put_image(client, "image=vol_new", volume.getvalue(), "scan.nii.gz").json() == {"image": "vol_new"}
    assert {"img_new", "named_7", "vol_new"} <= set(_record(server)["objects"])


def test_replacing_an_image_with_labels_needs_to_say_what_becomes_of_them(server, clean):
    client, studies = server["client"], server["studies"]
    assert _put_label(client, "img_1", _label()).status_code == 200
    image = studies / "img_1.png"
    before = image.read_bytes()

    response = _put_image(client, "image=img_1", _picture(21))
    assert response.status_code == 409, response.text
    assert "image 'img_1' has labels (tags: final)" in response.json()["detail"] and "labels=keep" in response.json()["detail"]
    assert image.read_bytes() == before
    response = _put_image(client, "image=img_1&labels=keep", _picture(21, (40, 50)))
    assert response.status_code == 409 and "does not fit the new image" in response.json()["detail"], response.text
    assert _put_image(client, "image=img_1&labels=bogus", _picture(21)).status_code == 400
    assert image.read_bytes() == before and client.get("/datastore/label?label=img_1&tag=final").status_code == 200

    assert _put_image(client, "image=img_1&labels=keep", _picture(21)).status_code == 200
    assert image.read_bytes() == _picture(21)
    assert client.get("/datastore/label?label=img_1&tag=final").content == _label()
    assert _put_image(client, "image=img_1&labels=remove", _picture(22, (40, 50))).status_code == 200
    assert client.get("/datastore/label?label=img_1&tag=final").status_code == 404
    assert not (studies / "labels" / "final" / "img_1.png").exists()
    assert "final" not in _record(server)["objects"]["img_1"]["labels"]


# -- items 6 and 7: a full disk changes nothing and is a 507 --------------------------------------------------
@pytest.mark.parametrize(
    "request_kind, fault, message",
    [
        ("label", "*/labels/final/.img_2.png.*", "the 'final' label of image 'img_2' could not be written: the server's disk is full"),
        ("label", "*/.datastore_v2.json.*", "the 'final' label of image 'img_2' could not be written: the server's disk is full"),
        ("image", "*/studies/.img_2.png.*", "image 'img_2' could not be written: the server's disk is full"),
        ("image", "*/.datastore_v2.json.*", "image 'img_2' could not be written: the server's disk is full"),
        ("new image", "*/studies/.img_9.png.*", "image 'img_9' could not be written: the server's disk is full"),
        ("new image", "*/.datastore_v2.json.*", "image 'img_9' could not be written: the server's disk is full"),
    ],
)
def test_a_full_disk_is_a_507_and_changes_neither_files_nor_record(server, clean, request_kind, fault, message):
    client, studies = server["client"], server["studies"]
    if client.get("/datastore/label?label=img_2&tag=final").status_code != 200:
        assert _put_label(client, "img_2", _label()).status_code == 200
    files = {p: p.read_bytes() for p in (studies / "img_2.png", studies / "labels" / "final" / "img_2.png", studies / "datastore_v2.json")}
    record = _record(server)
    send = {
        "label": lambda: _put_label(client, "img_2", _label(value=0)),
        "image": lambda: _put_image(client, "image=img_2&labels=remove", _picture(31)),
        "new image": lambda: _put_image(client, "image=img_9", _picture(32)),
    }[request_kind]
    with faults(server, {fault: "ENOSPC"}):
        response = send()
    assert response.status_code == 507, response.text
    assert message in response.json()["detail"] and "nothing of it was changed" in response.json()["detail"]
    _assert_no_server_path(server, response.text)
    assert {p: p.read_bytes() for p in files} == files, "a file changed"
    assert _record(server) == record and not (studies / "img_9.png").exists()
    # with room on the disk again, the same request goes through
    assert send().status_code == 200
    if request_kind == "new image":
        assert client.delete("/datastore/image?id=img_9").status_code == 200


def test_another_io_error_is_a_503(server, clean):
    with faults(server, {"*/labels/final/.img_3.png.*": "EIO"}):
        response = _put_label(server["client"], "img_3", _label())
    assert response.status_code == 503, response.text
    assert "could not be written: the server's disk could not be written (Input/output error)" in response.json()["detail"]
    assert server["client"].get("/datastore/label?label=img_3&tag=final").status_code == 404


def test_a_full_disk_under_monai_labels_own_routes_is_a_507_without_server_paths(server, clean):
    with faults(server, {"*/.datastore_v2.json.*": "ENOSPC"}):
        response = server["client"].put("/datastore/image/info?image=img_0", data={"info": json.dumps({"reviewed": True})})
    assert response.status_code == 507, response.text
    assert "'datastore_v2.json' could not be written: the server's disk is full" in response.json()["detail"]
    _assert_no_server_path(server, response.text)


# -- item 9: the prompt record is best effort --------------------------------------------------------------
def test_a_prompt_record_the_disk_refuses_costs_no_mask(server, clean):
    client = server["client"]
    with faults(server, {"*/model/.last_prompts.json.*": "ENOSPC"}):
        response = client.post("/infer/imedsam?image=img_0&output=image", data={"params": json.dumps({"box": [10, 10, 60, 50]})})
    assert response.status_code == 200, response.text
    assert np.asarray(Image.open(io.BytesIO(response.content))).shape == SHAPE
    assert "could not write the prompt records" in (server["root"] / "server.log").read_text()


# -- item 4: model uploads ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two state dicts of the served network (built as the app builds it, from the bundle), and a misfit."""
    overrides = import_app_module("lib.configs.imedsam").network_overrides(NETWORK)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(ROOT / "bundle"), **overrides, "sam_checkpoint": None})
    state = parser.get_parsed_content("network_def").state_dict()
    folder = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, value in {
        "first": state,
        "second": {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()},
        "misfit": {k: v[..., :1] if v.dim() else v for k, v in state.items()},
    }.items():
        buffer = io.BytesIO()
        torch.save(value, buffer)
        made[name] = buffer.getvalue()
        (folder / f"{name}.pt").write_bytes(made[name])
    return made


def _put_model(client, content: bytes, name: str = "model.pt"):
    return client.put("/model/imedsam", files={"file": (name, content)})


def _infer_model(client) -> str:
    response = client.post("/infer/imedsam?image=img_3&output=json", data={"params": json.dumps({"box": [10, 10, 60, 50]})})
    assert response.status_code == 200, response.text
    return response.json()["model"]


def test_an_uploaded_checkpoint_is_checked_published_and_the_one_it_replaces_kept(server, clean, checkpoints):
    client, model = server["client"], server["app_dir"] / "model"
    served = model / "imedsam.pt"
    for content, message in [(np.random.default_rng(1).bytes(1 << 20), "the checkpoint cannot be served: could not read checkpoint random.pt"),
                             (checkpoints["misfit"], "does not fit the model")]:  # fmt: skip
        response = _put_model(client, content, "random.pt")
        assert response.status_code == 400, response.text
        assert message in response.json()["detail"] and "weights_only=False" not in response.text
        _assert_no_server_path(server, response.text)
        assert not served.exists()
        assert _infer_model(client) == "untrained"  # still served, by the network the app started with
    assert client.put("/model/nothing", files={"file": ("m.pt", checkpoints["first"])}).status_code == 404

    first = _put_model(client, checkpoints["first"], "first.pt")
    assert first.status_code == 200 and first.json()["previous"] is None, first.text
    assert served.read_bytes() == checkpoints["first"] and _infer_model(client).startswith("imedsam.pt@")
    second = _put_model(client, checkpoints["second"], "second.pt")
    assert second.status_code == 200 and second.json()["previous"] == "imedsam.previous.pt", second.text
    assert served.read_bytes() == checkpoints["second"] and (model / "imedsam.previous.pt").read_bytes() == checkpoints["first"]
    version = _infer_model(client)

    response = _put_model(client, b"\x80\x02garbage", "bad.pt")  # a bad upload now changes nothing either
    assert response.status_code == 400 and served.read_bytes() == checkpoints["second"]
    with faults(server, {"*/model/.imedsam.pt.*": "ENOSPC"}):
        response = _put_model(client, checkpoints["first"], "third.pt")
    assert response.status_code == 507, response.text
    assert "the checkpoint 'third.pt' could not be written: the server's disk is full; the served model was not changed" in response.text
    assert served.read_bytes() == checkpoints["second"] and (model / "imedsam.previous.pt").read_bytes() == checkpoints["first"]
    assert _infer_model(client) == version
