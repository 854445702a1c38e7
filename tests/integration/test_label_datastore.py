"""The label app's datastore, storage and model upload, in process (no server): headers compared before any
voxel is decoded, a change of files and record made whole or not at all, full disks injected as ENOSPC.

The same cases over HTTP, against a real server, are in ``test_label_storage.py``.
"""

import errno
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")
from PIL import Image  # noqa: E402

from conftest import import_app_module  # noqa: E402
from imedsam.data.headers import read_header  # noqa: E402
from imedsam.inference import load_image_array, spatial_shape  # noqa: E402
from upload_files import forged_nifti  # noqa: E402

datastore_module = import_app_module("lib.server.datastore")
storage = import_app_module("lib.server.storage")
guard = import_app_module("lib.server.guard")
model_upload = import_app_module("lib.server.model_upload")

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (72, 96)  # height, width of the pictures
VOLUME = (40, 32, 6)
LABELS = {"polyp": 1}


def _label(value=1, shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[10:30, 20:50] = value
    return label


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full(SHAPE, 40 * (i + 1), np.uint8)).save(folder / f"img_{i}.png")
    nib.save(nib.Nifti1Image(np.zeros(VOLUME, np.int16), np.eye(4)), folder / "vol_0.nii.gz")
    return folder


def _datastore(studies):
    return datastore_module.CheckedDatastore(str(studies), LABELS, auto_reload=False)


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _staging_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _full_disk(monkeypatch, where: str, code: int = errno.ENOSPC):
    """Make every fsync of a file whose path contains ``where`` fail with ``code`` (a full disk shows there
    first: the data is in the page cache, the disk has no blocks for it). Returns the failed paths."""
    failed = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if where in path:
            failed.append(path)
            raise OSError(code, os.strerror(code), path)
        return real(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    return failed


# -- item 3: headers first ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".seg.nrrd"])
def test_a_header_gives_the_shape_monai_decodes(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    if suffix in (".nii", ".nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros(VOLUME, np.int16), np.eye(4)), path)
    elif suffix.endswith(".nrrd"):
        nrrd.write(str(path), np.zeros(VOLUME, np.uint8), {"space": "left-posterior-superior", "space directions": np.eye(3),
                                                            "space origin": np.zeros(3)})  # fmt: skip
    else:
        Image.fromarray(np.zeros((*SHAPE, 3), np.uint8)).save(path)
    header = read_header(path)
    decoded = load_image_array(str(path))
    assert header.shape == tuple(decoded.shape)
    assert header.spatial == spatial_shape(decoded, header.planar)


def test_a_label_whose_header_does_not_fit_is_refused_before_any_voxel_is_decoded(studies, tmp_path, monkeypatch):
    datastore = _datastore(studies)
    decoded = []
    monkeypatch.setattr(datastore_module, "load_image_array", lambda path: decoded.append(path))
    # a 17 MB gzip of zeros took 78 s and 9.4 GB before its 400: this one claims the same in a few bytes
    forged = tmp_path / "forged.nii.gz"
    forged.write_bytes(forged_nifti((2000, 2000, 1000), dtype=np.uint8))
    with pytest.raises(datastore_module.DatastoreRequestError, match=r"has shape \(2000, 2000, 1000\); its image 'vol_0' has \(40, 32, 6\)"):
        datastore.save_label("vol_0", str(forged), "final", {})
    # a 4D label with the volume's first three sizes would decode 50 times the image
    layered = tmp_path / "layered.nii.gz"
    layered.write_bytes(forged_nifti((*VOLUME, 50), dtype=np.uint8))
    with pytest.raises(datastore_module.DatastoreRequestError, match="one value per voxel"):
        datastore.save_label("vol_0", str(layered), "final", {})
    # a picture whose header claims 9000 x 9000
    big = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(big)
    with pytest.raises(datastore_module.DatastoreRequestError, match=r"has shape \(9000, 9000\); its image 'img_0' has \(96, 72\)"):
        datastore.save_label("img_0", str(big), "final", {})
    assert decoded == [], "a voxel was decoded before the shapes were compared"
    assert datastore.get_label_uri("vol_0", "final") == "" and datastore.get_label_uri("img_0", "final") == ""


def test_an_image_upload_above_the_limits_is_refused_from_its_header(studies, tmp_path, monkeypatch):
    datastore = _datastore(studies)
    forged = tmp_path / "huge.nii.gz"
    forged.write_bytes(forged_nifti((2000, 2000, 150), dtype=np.uint8))  # the 2.6 MB case: 9 s and 2.9 GB before its 400
    with pytest.raises(datastore_module.DatastoreRequestError, match="600,000,000 voxels, above the limit of 268,435,456") as raised:
        datastore.add_image("huge", str(forged), {}, name="huge.nii.gz")
    assert raised.value.status == 400 and str(tmp_path) not in str(raised.value)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(forged_nifti(VOLUME, b"\0" * 100))  # a header, and 100 of its 15,360 bytes
    with pytest.raises(datastore_module.DatastoreRequestError, match="cut short"):
        datastore.add_image("cut", str(cut), {}, name="cut.nii.gz")
    assert sorted(datastore.list_images()) == ["img_0", "img_1", "vol_0"]
    assert sorted(os.listdir(studies)) == [".lock", "datastore_v2.json", "img_0.png", "img_1.png", "labels", "vol_0.nii.gz"]


# -- item 6 (and 7): a label save is whole or not at all ------------------------------------------------------
@pytest.mark.parametrize("fails", ["label", "record"])
def test_a_label_save_the_disk_refuses_changes_neither_label_nor_record(studies, tmp_path, monkeypatch, fails):
    datastore = _datastore(studies)
    old = _write(tmp_path / "old.png", _label())
    datastore.save_label("img_0", str(old), "final", {})
    stored = studies / "labels" / "final" / "img_0.png"
    record = (studies / "datastore_v2.json").read_bytes()
    memory = datastore.json()
    new = _write(tmp_path / "new.png", _label(shape=SHAPE) * 0)
    failed = _full_disk(monkeypatch, "labels/final/." if fails == "label" else "datastore_v2.json")
    with pytest.raises(datastore_module.StorageError) as raised:
        datastore.save_label("img_0", str(new), "final", {"client": "x"})
    assert failed and raised.value.status == 507
    assert "the 'final' label of image 'img_0' could not be written: the server's disk is full" in str(raised.value)
    assert str(studies) not in str(raised.value)
    np.testing.assert_array_equal(np.asarray(Image.open(stored)), _label())  # the old label, whole
    assert (studies / "datastore_v2.json").read_bytes() == record and datastore.json() == memory
    assert _staging_files(studies) == []
    # a label never saved before: after the failure there is no file and no record of it
    with pytest.raises(datastore_module.StorageError):
        datastore.save_label("img_1", str(new), "final", {})
    assert not (studies / "labels" / "final" / "img_1.png").exists() and datastore.get_label_uri("img_1", "final") == ""
    assert _staging_files(studies) == []
    monkeypatch.undo()  # the disk has room again: the same save goes through
    assert datastore.save_label("img_0", str(new), "final", {}) == "img_0"
    assert not np.asarray(Image.open(stored)).any()


def test_another_io_error_is_a_503_and_a_label_in_another_format_is_put_back(studies, tmp_path, monkeypatch):
    datastore = _datastore(studies)
    datastore.save_label("img_0", str(_write(tmp_path / "old.bmp", _label())), "final", {})
    _full_disk(monkeypatch, "datastore_v2.json", errno.EIO)
    with pytest.raises(datastore_module.StorageError, match="could not be written: the server's disk could not be written") as raised:
        datastore.save_label("img_0", str(_write(tmp_path / "new.png", _label())), "final", {})
    assert raised.value.status == 503
    # the .png was removed again and the .bmp it replaced is back
    assert sorted(os.listdir(studies / "labels" / "final")) == ["img_0.bmp"]
    assert datastore.get_label_uri("img_0", "final").endswith("img_0.bmp")


# -- item 2: image uploads -----------------------------------------------------------------------------------
def test_an_image_with_labels_is_replaced_only_when_the_request_says_what_becomes_of_them(studies, tmp_path):
    datastore = _datastore(studies)
    datastore.save_label("img_0", str(_write(tmp_path / "label.png", _label())), "final", {})
    same = _write(tmp_path / "same.png", np.full(SHAPE, 200, np.uint8))
    other = _write(tmp_path / "other.png", np.full((10, 10), 200, np.uint8))
    image = studies / "img_0.png"
    before = image.read_bytes()
    with pytest.raises(datastore_module.DatastoreRequestError, match="has labels \\(tags: final\\).*labels=keep.*labels=remove") as raised:
        datastore.add_image("img_0", str(same), {}, name="same.png")
    assert raised.value.status == 409 and image.read_bytes() == before
    with pytest.raises(datastore_module.DatastoreRequestError, match="does not fit the new image") as raised:
        datastore.add_image("img_0", str(other), {}, labels="keep", name="other.png")
    assert raised.value.status == 409 and image.read_bytes() == before
    assert datastore.add_image("img_0", str(same), {"note": 1}, labels="keep", name="same.png") == "img_0"
    assert image.read_bytes() == same.read_bytes() and datastore.get_label_uri("img_0", "final")
    assert json.loads((studies / "datastore_v2.json").read_text())["objects"]["img_0"]["labels"]["final"]["ext"] == ".png"
    assert datastore.add_image("img_0", str(other), {}, labels="remove", name="other.png") == "img_0"
    assert datastore.get_label_uri("img_0", "final") == "" and not (studies / "labels" / "final" / "img_0.png").exists()
    # a new format replaces the old file: no second file of the same id is left for a rescan to find
    assert datastore.add_image("img_1", str(_write(tmp_path / "new.jpeg", np.zeros(SHAPE, np.uint8))), {}, name="x.jpeg") == "img_1"
    assert sorted(p.name for p in studies.glob("img_1.*")) == ["img_1.jpeg"]
    assert _staging_files(studies) == []


@pytest.mark.parametrize("fails", ["image", "record"])
def test_an_image_upload_the_disk_refuses_changes_nothing(studies, tmp_path, monkeypatch, fails):
    datastore = _datastore(studies)
    datastore.save_label("img_0", str(_write(tmp_path / "label.png", _label())), "final", {})
    image, label = studies / "img_0.png", studies / "labels" / "final" / "img_0.png"
    before = image.read_bytes(), label.read_bytes(), (studies / "datastore_v2.json").read_bytes(), datastore.json()
    replacement = _write(tmp_path / "new.png", np.full(SHAPE, 7, np.uint8))
    _full_disk(monkeypatch, "/.img_0.png" if fails == "image" else "datastore_v2.json")
    with pytest.raises(datastore_module.StorageError, match="image 'img_0' could not be written: the server's disk is full") as raised:
        datastore.add_image("img_0", str(replacement), {}, labels="remove", name="new.png")
    assert raised.value.status == 507
    after = image.read_bytes(), label.read_bytes(), (studies / "datastore_v2.json").read_bytes(), datastore.json()
    assert after == before, "the image, its label or the record changed"
    # a new image the disk refuses is not adopted, on disk or in the record
    _full_disk(monkeypatch, "/.img_9.png" if fails == "image" else "datastore_v2.json")
    with pytest.raises(datastore_module.StorageError):
        datastore.add_image("img_9", str(replacement), {}, name="new.png")
    assert not (studies / "img_9.png").exists() and "img_9" not in datastore.list_images()
    assert _staging_files(studies) == []


def test_every_file_the_app_writes_has_one_mode(tmp_path):
    """Records, copies and published files get 0644 less the umask (mkstemp alone gave 0600), as images do."""
    expected = storage.FILE_MODE & ~storage._UMASK
    (tmp_path / "upload").write_bytes(b"label")
    storage.write_json_atomically(str(tmp_path / "record.json"), {"a": 1})
    storage.copy_atomically(str(tmp_path / "upload"), str(tmp_path / "copy.png"))
    with storage.FileChanges() as changes:
        changes.put(str(tmp_path / "upload"), str(tmp_path / "label.png"))
    for name in ("record.json", "copy.png", "label.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_changes_roll_back_on_a_disk_without_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(storage.os, "link", no_links)
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    (tmp_path / "new").write_bytes(b"new")
    with pytest.raises(RuntimeError), storage.FileChanges() as changes:
        changes.put(str(tmp_path / "new"), str(tmp_path / "a"))
        changes.remove(str(tmp_path / "b"))
        changes.put(str(tmp_path / "new"), str(tmp_path / "c"))
        raise RuntimeError("the record could not be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "new"]
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"


def test_a_restart_removes_what_a_killed_change_left_but_no_file_of_the_user(studies):
    (studies / ".img_0.png.1a2b3c4d5e6f.tmp").write_bytes(b"old version kept by a killed save")
    (studies / "labels" / "final").mkdir(parents=True)
    (studies / "labels" / "final" / ".img_0.png.abc123.tmp").write_bytes(b"half a label")
    (studies / "notes.tmp").write_text("the user's")
    _datastore(studies)
    assert _staging_files(studies) == ["notes.tmp"]


# -- item 10: one list of suffixes ---------------------------------------------------------------------------
def test_one_list_of_suffixes_serves_uploads_and_the_rescan(tmp_path):
    assert guard.UPLOAD_SUFFIXES is datastore_module.SUFFIXES
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    pictures = [s for s in datastore_module.SUFFIXES if s in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")]
    for i, suffix in enumerate(pictures):
        _write(studies / f"img_{i}{suffix}", np.zeros(SHAPE, np.uint8))
        _write(studies / "labels" / "final" / f"img_{i}{suffix}", _label())
    volumes = [s for s in datastore_module.SUFFIXES if s not in pictures]
    for i, suffix in enumerate(volumes):
        path = studies / f"vol_{i}{suffix}"
        if "nii" in suffix:
            nib.save(nib.Nifti1Image(np.zeros(VOLUME, np.int16), np.eye(4)), path)
        else:
            nrrd.write(str(path), np.zeros(VOLUME, np.uint8))
    (studies / "datastore_v2.json").write_text('{"name": "torn')  # the rebuild after a torn record
    datastore = _datastore(studies)
    assert len(datastore.list_images()) == len(datastore_module.SUFFIXES)
    assert sorted(datastore.get_labeled_images()) == [f"img_{i}" for i in range(len(pictures))]
    for i, suffix in enumerate(volumes):  # each file keeps its whole ending (".seg.nrrd", not ".nrrd")
        assert datastore.get_image_uri(f"vol_{i}").endswith(f"vol_{i}{suffix}")


# -- item 9: the prompt record is best effort ----------------------------------------------------------------
def test_a_prompt_record_the_disk_refuses_is_logged_and_kept_in_memory(tmp_path, monkeypatch, caplog):
    records = storage.PromptRecords(str(tmp_path / "last_prompts.json"))
    _full_disk(monkeypatch, "last_prompts.json")
    with caplog.at_level(logging.WARNING):
        assert records.set("img_0", [1, 2, 30, 40], None) is False
    assert "could not write the prompt records" in caplog.text
    assert records.get("img_0") == {"box": [1, 2, 30, 40], "slice": None}
    assert not (tmp_path / "last_prompts.json").exists() and _staging_files(tmp_path) == []
    monkeypatch.undo()
    assert records.set("img_1", [0, 0, 5, 5], 3) is True
    assert set(json.loads((tmp_path / "last_prompts.json").read_text())) == {"img_0", "img_1"}


# -- item 19: DICOM files in a local studies folder --------------------------------------------------------
def test_dcm_files_in_a_local_studies_folder_are_named_once_in_the_log(studies, caplog):
    (studies / "ct_0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (studies / "CT_0002.DCM").write_bytes(b"\0" * 132 + b"DICM")
    series = studies / "series_1"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i}.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (studies / "labels").mkdir()
    (studies / "labels" / "stray.dcm").write_bytes(b"")  # the labels folder is not the images'
    with caplog.at_level(logging.WARNING, logger=datastore_module.logger.name):
        datastore = _datastore(studies)
    warnings = [r.getMessage() for r in caplog.records if ".dcm" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"5 .dcm files in the studies folder {studies} are skipped" in warnings[0]
    assert "DICOMweb" in warnings[0] and "Orthanc" in warnings[0] and "--studies http://" in warnings[0]
    assert sorted(datastore.list_images()) == ["img_0", "img_1", "vol_0"]


def test_a_studies_folder_without_dcm_files_logs_no_dicom_warning(studies, caplog):
    with caplog.at_level(logging.WARNING, logger=datastore_module.logger.name):
        _datastore(studies)
    assert ".dcm" not in caplog.text


# -- item 4: a model upload --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def network():
    """The network the app serves with ``--conf encoder vit_tiny --conf image_size 64``, built as the app builds
    it: from the bundle's ``network_def``."""
    overrides = import_app_module("lib.configs.imedsam").network_overrides({"encoder": "vit_tiny", "image_size": "64"})
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(ROOT / "bundle"), **overrides, "sam_checkpoint": None})
    return parser.get_parsed_content("network_def").eval()


def _checkpoint(tmp_path, name, state) -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_a_bad_checkpoint_is_refused_before_it_replaces_anything(tmp_path, network):
    published = tmp_path / "model" / "imedsam.pt"
    published.parent.mkdir()
    good = network.state_dict()
    published.write_bytes(Path(_checkpoint(tmp_path, "served.pt", good)).read_bytes())
    served = published.read_bytes()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    wrong = _checkpoint(tmp_path, "wrong.pt", {k: v[..., :1] if v.dim() else v for k, v in good.items()})
    nan = _checkpoint(tmp_path, "nan.pt", {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in good.items()})
    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": good, "optimizer": io.BytesIO(b"x")}, pickled)
    cases = [(str(garbage), "could not read checkpoint mine.pt"), (wrong, "does not fit the model"), (nan, "NaN or infinite values"),
             (str(pickled), "not a checkpoint of tensors only")]  # fmt: skip
    for path, message in cases:
        with pytest.raises(datastore_module.DatastoreRequestError, match=message) as raised:
            model_upload.publish_checkpoint(network, path, str(published), "mine.pt")
        assert raised.value.status == 400 and str(tmp_path) not in str(raised.value)
        assert "weights_only=False" not in str(raised.value)
    assert published.read_bytes() == served and sorted(os.listdir(published.parent)) == ["imedsam.pt"]


def test_a_good_checkpoint_is_published_and_the_one_it_replaces_kept(tmp_path, network, monkeypatch):
    published = tmp_path / "model" / "imedsam.pt"
    published.parent.mkdir()
    first = _checkpoint(tmp_path, "first.pt", network.state_dict())
    second_state = {k: v + 1 if v.is_floating_point() else v for k, v in network.state_dict().items()}
    second = _checkpoint(tmp_path, "second.pt", second_state)
    assert model_upload.publish_checkpoint(network, first, str(published), "first.pt")["previous"] is None
    answer = model_upload.publish_checkpoint(network, second, str(published), "second.pt")
    assert answer["previous"] == "imedsam.previous.pt" and answer["checksum"].startswith("SHA256:")
    assert published.read_bytes() == Path(second).read_bytes()
    assert (published.parent / "imedsam.previous.pt").read_bytes() == Path(first).read_bytes()
    # a full disk while publishing: neither the served file nor the kept one changes
    _full_disk(monkeypatch, "model/.imedsam.pt")
    with pytest.raises(datastore_module.StorageError, match="the checkpoint 'third.pt' could not be written.*served model was not changed") as raised:
        model_upload.publish_checkpoint(network, first, str(published), "third.pt")
    assert raised.value.status == 507
    assert published.read_bytes() == Path(second).read_bytes()
    assert (published.parent / "imedsam.previous.pt").read_bytes() == Path(first).read_bytes()
    assert sorted(os.listdir(published.parent)) == ["imedsam.previous.pt", "imedsam.pt"]
