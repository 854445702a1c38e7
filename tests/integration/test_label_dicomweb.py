"""The app with a DICOMweb store: its answers when the store fails, and its label saves (DICOM SEG, then STOW) on a
full disk and after kill -9 (the browser test, tests/e2e, drives the same paths on a real Orthanc; these cases run
without one)."""

import builtins
import copy
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")
nib = pytest.importorskip("nibabel")

from conftest import import_app_module  # noqa: E402
from e2e.ct_series import Phantom, ct_series  # noqa: E402

# MONAI's pydicom plugin for a GPU DICOM decoder warns about itself when reading the series
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")

STORE = "http://127.0.0.1:8042/dicom-web"


@pytest.fixture(scope="module")
def dicomweb():
    return import_app_module("lib.server.dicomweb")


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    request = requests.Request("GET", f"{STORE}/studies/1.2/series/3.4").prepare()
    response.request = request
    return requests.HTTPError(f"{status} error", response=response, request=request)


@pytest.mark.parametrize(
    "error, status, words",
    [
        (requests.ConnectionError("Connection refused"), 502, "cannot be reached"),
        (requests.ReadTimeout("read timed out"), 504, "did not answer in time"),
        (http_error(404), 404, "has no such study or series"),
        (http_error(500), 502, "refused the request with HTTP 500"),
        (InvalidDicomError("missing DICM prefix"), 502, "not DICOM"),
    ],
)
def test_store_failures_get_a_status_and_a_message_naming_the_store(dicomweb, error, status, words):
    answer_status, message = dicomweb.store_error_answer(STORE, error)
    assert answer_status == status
    assert STORE in message and words in message


# -- item 20: the DICOMweb save path (label -> DICOM SEG -> STOW) on a full disk and after kill -9 -------------
# MONAI Label's DICOMweb datastore runs in process on a store held in memory (the calls it makes, dicomweb_client's
# names), with dcmqi's real itkimage2segimage; tests/e2e drives the same path on a real Orthanc.
DCMQI = shutil.which("itkimage2segimage", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
PHANTOM = Phantom(shape=(48, 40, 6), centre=(28.0, 18.0, 2.5), radii=(6.0, 5.0, 2.0), drift=1.0)
needs_dcmqi = pytest.mark.skipif(DCMQI is None, reason="dcmqi's itkimage2segimage is not installed (the 'label' extra)")


class MemoryStore:
    """A DICOMweb store in memory, with the calls MONAI Label's DICOMweb datastore makes; ``stored`` is what STOW
    received."""

    base_url = "http://127.0.0.1:9/dicom-web"  # never contacted

    def __init__(self, datasets) -> None:
        self.series: dict[str, list] = {}
        self.stored: list = []
        for ds in datasets:
            self.series.setdefault(ds.SeriesInstanceUID, []).append(ds)

    def search_for_series(self, search_filters=None, **_):
        found = []
        for items in self.series.values():
            first = items[0]
            if all(str(first.get(key, "")) == str(value) for key, value in (search_filters or {}).items()):
                summary = Dataset()
                for key in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "StudyDate", "StudyTime", "PatientID"):
                    setattr(summary, key, first.get(key, ""))
                found.append(summary.to_json_dict())
        return found

    def retrieve_series(self, study_instance_uid, series_instance_uid, **_):
        return [copy.deepcopy(ds) for ds in self.series[series_instance_uid]]

    def store_instances(self, datasets, **_):
        self.stored.extend(datasets)
        answer = Dataset()
        answer.RetrieveURL = f"{self.base_url}/studies/{datasets[0].StudyInstanceUID}/series/{datasets[0].SeriesInstanceUID}"
        return answer


def _datastore(dicomweb, store: MemoryStore, cache: Path):
    """The app's DICOMweb datastore on ``store``, without MONAI Label's file watcher (it would rewrite the record in
    the background while a test reads it)."""
    datastore = dicomweb.CheckedDICOMWebDatastore(store, {"Modality": "CT"}, cache_path=str(cache))
    datastore._observer.stop()
    datastore._observer.join(timeout=10)
    return datastore


@pytest.fixture
def dicom_store(tmp_path, monkeypatch, dicomweb):
    """A :class:`MemoryStore` holding one CT series, the app's DICOMweb datastore on it (cache and temporary files in
    ``tmp_path``), the series' id and a label volume of its shape."""
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # MONAI Label's conversions write here
    store = MemoryStore(ct_series(PHANTOM))
    datastore = _datastore(dicomweb, store, tmp_path / "cache")
    (series,) = store.series
    image = nib.load(datastore.get_image_uri(series))
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 8:18, 1:4] = 1
    nib.save(nib.Nifti1Image(label, image.affine), tmp_path / "label.nii.gz")
    return SimpleNamespace(store=store, datastore=datastore, series=series, label=tmp_path / "label.nii.gz", tmp=tmp_path / "tmp",
                           cache=Path(datastore._datastore_path))  # fmt: skip


def _limited_converter(folder: Path, kib: int) -> None:
    """Put an ``itkimage2segimage`` first on ``PATH`` that runs the real one with files limited to ``kib`` KiB: its
    output is cut short (EFBIG), as on a full disk."""
    folder.mkdir()
    wrapper = folder / "itkimage2segimage"
    wrapper.write_text(f"#!/bin/bash\ntrap '' XFSZ\nulimit -f {kib}\nexec '{DCMQI}' \"$@\"\n")
    wrapper.chmod(0o755)
    os.environ["PATH"] = os.pathsep.join([str(folder), os.environ["PATH"]])  # restored by the fixture's monkeypatch


def _full_disk_at(monkeypatch, folder: Path, code: int = errno.ENOSPC) -> None:
    """Every fsync of a file in ``folder`` fails with ``code`` (as tests/faults/sitecustomize.py does in a server)."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _cached_label(dicom_store) -> Path:
    return dicom_store.cache / "labels" / "final" / f"{dicom_store.series}.nii.gz"


@needs_dcmqi
def test_a_label_goes_to_the_store_as_one_whole_seg_and_into_the_cache(dicom_store, dicomweb):
    datastore, store = dicom_store.datastore, dicom_store.store
    assert datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {}) == dicom_store.series
    (seg,) = store.stored
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_store.series
    assert _cached_label(dicom_store).read_bytes() == dicom_store.label.read_bytes()
    record = json.loads((dicom_store.cache / "datastore_v2.json").read_text())
    assert record["objects"][dicom_store.series]["labels"]["final"]["info"]["SeriesInstanceUID"] == seg.SeriesInstanceUID
    assert not list(dicom_store.tmp.glob("*.dcm")), "the converted SEG was left behind"


@needs_dcmqi
def test_a_seg_cut_short_is_never_taken_for_a_whole_one(dicom_store, dicomweb):
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    image_dir = dicom_store.cache / dicom_store.series
    seg = Path(nifti_to_dicom_seg(str(image_dir), str(dicom_store.label), None))
    content = seg.read_bytes()
    assert dicomweb.whole_segmentation(str(seg))
    for end in sorted({0, 1, 128, 132, 200, *range(300, len(content), max(1, len(content) // 97)), len(content) - 1}):
        seg.write_bytes(content[:end])
        assert not dicomweb.whole_segmentation(str(seg)), f"{end} of {len(content)} bytes taken for a whole SEG"


@needs_dcmqi
@pytest.mark.parametrize("code, status", [(errno.ENOSPC, 507), (errno.EIO, 503), (None, 500)])
def test_a_seg_the_temporary_disk_cuts_short_is_a_507_and_the_store_gets_nothing(dicom_store, dicomweb, monkeypatch, tmp_path,
                                                                                 code, status):  # fmt: skip
    datastore, store = dicom_store.datastore, dicom_store.store
    datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {})
    cached, sent = _cached_label(dicom_store).read_bytes(), len(store.stored)
    _limited_converter(tmp_path / "bin", kib=1)
    if code is not None:  # the disk is full (or failing): the server's own writes there fail too
        _full_disk_at(monkeypatch, dicom_store.tmp, code)
    with pytest.raises(dicomweb.DatastoreRequestError) as refused:
        datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {})
    assert refused.value.status == status
    message = str(refused.value)
    assert message.startswith(f"the 'final' label of image '{dicom_store.series}' could not be")
    assert "nothing was stored in the DICOMweb store" in message
    assert {507: "the server's disk is full", 503: "Input/output error", 500: "itkimage2segimage failed"}[status] in message
    assert len(store.stored) == sent, "something was sent to the store"
    assert _cached_label(dicom_store).read_bytes() == cached
    assert not list(dicom_store.tmp.glob("*.dcm")), "the cut SEG was left behind"


@needs_dcmqi
def test_a_full_disk_in_the_conversions_own_writes_is_a_507_and_the_store_gets_nothing(dicom_store, dicomweb, monkeypatch):
    store, tmp = dicom_store.store, str(dicom_store.tmp)
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):  # the template dcmqi reads, written beside its output
        if any(m in mode for m in "wax") and str(file).startswith(tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(dicomweb.StorageError) as refused:
        dicom_store.datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {})
    assert refused.value.status == 507 and "nothing was stored in the DICOMweb store" in str(refused.value)
    assert tmp not in str(refused.value)
    assert not store.stored and not _cached_label(dicom_store).exists()


@needs_dcmqi
def test_a_cache_that_cannot_take_the_label_costs_no_label_and_keeps_no_stale_copy(dicom_store, dicomweb, monkeypatch, caplog):
    datastore, store = dicom_store.datastore, dicom_store.store
    datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {})
    record = (dicom_store.cache / "datastore_v2.json").read_bytes()
    _full_disk_at(monkeypatch, dicom_store.cache)
    with caplog.at_level(logging.WARNING):
        assert datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {}) == dicom_store.series
    assert len(store.stored) == 2  # the store has the new label, whole
    assert not _cached_label(dicom_store).exists()  # the old copy is gone: the label is read from the store next
    assert (dicom_store.cache / "datastore_v2.json").read_bytes() == record
    assert "is stored in the DICOMweb store, but the server's cache could not take it" in caplog.text
    # a label only the cache keeps (not 'final') is refused whole
    with pytest.raises(dicomweb.StorageError) as refused:
        datastore.save_label(dicom_store.series, str(dicom_store.label), "draft", {})
    assert refused.value.status == 507 and "nothing of it was changed" in str(refused.value)
    assert not (dicom_store.cache / "labels" / "draft" / f"{dicom_store.series}.nii.gz").exists()
    assert not list(dicom_store.cache.rglob("*.tmp"))


@needs_dcmqi
def test_after_kill_9_the_cache_starts_from_a_torn_record_and_its_staging_files_are_removed(dicom_store, dicomweb):
    datastore = dicom_store.datastore
    datastore.save_label(dicom_store.series, str(dicom_store.label), "final", {})
    record = dicom_store.cache / "datastore_v2.json"
    record.write_bytes(record.read_bytes()[:100])  # MONAI Label truncates the record, then writes: killed between
    staging = [dicom_store.cache / ".datastore_v2.json.a1b2c3.tmp", _cached_label(dicom_store).with_name(f".{dicom_store.series}.nii.gz.d4e5f6.tmp")]
    for path in staging:
        path.write_bytes(b"half")
    restarted = _datastore(dicomweb, dicom_store.store, dicom_store.cache.parent)
    assert len(list(dicom_store.cache.glob("datastore_v2.json.torn-*"))) == 1
    assert not any(path.exists() for path in staging)
    assert restarted.get_image_uri(dicom_store.series).endswith(".nii.gz")
    assert restarted.save_label(dicom_store.series, str(dicom_store.label), "final", {}) == dicom_store.series
    json.loads(record.read_text())


@needs_dcmqi
@pytest.mark.parametrize("image, tag, status", [("../../outside", "final", 404), ("SERIES", "../../x", 400), ("SERIES", "/abs", 400)])
def test_dicomweb_label_names_are_checked_before_any_path_is_made(dicom_store, dicomweb, image, tag, status):
    image = dicom_store.series if image == "SERIES" else image
    with pytest.raises(dicomweb.DatastoreRequestError) as refused:
        dicom_store.datastore.save_label(image, str(dicom_store.label), tag, {})
    assert refused.value.status == status and not dicom_store.store.stored


def test_the_dicomweb_label_route_answers_refusals_with_their_status_and_keeps_no_upload(tmp_path, dicomweb):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    guard = import_app_module("lib.server.guard")
    calls = []

    class Datastore:
        def save_label(self, image, path, tag, info, name):
            calls.append((image, os.path.basename(path), tag, name, Path(path).read_bytes()))
            raise dicomweb.StorageError(507, "the 'final' label of image '1.2' could not be written: the server's disk is full")

    instance = SimpleNamespace(datastore=Datastore, on_save_label=lambda image, label: {})
    app = FastAPI()
    guard.install_label_save(app, instance, str(tmp_path / "uploads"))
    with TestClient(app) as http:
        response = http.put("/datastore/label?image=1.2&tag=final", files={"label": ("seg.bin", b"\x01\x00")})
    assert response.status_code == 507 and response.json()["detail"].endswith("the server's disk is full"), response.text
    assert calls == [("1.2", "label.bin", "final", "seg.bin", b"\x01\x00")]
    assert not list((tmp_path / "uploads").iterdir())
