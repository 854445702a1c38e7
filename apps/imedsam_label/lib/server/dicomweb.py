"""A DICOMweb store behind the server: clear answers when it fails, and label saves that send it a whole DICOM SEG
or nothing.

With ``--studies http://.../dicom-web`` every image is fetched from the store when a request needs it, so a
store that is down, refuses a query or sends something that is not DICOM would surface as a bare 500 from
deep inside MONAI Label. :func:`install_store_error_answers` registers FastAPI exception handlers that answer
such requests with the status and a message naming the store; the server keeps serving.

:class:`CheckedDICOMWebDatastore` is MONAI Label's DICOMweb datastore with the save path and the local cache made
safe against a full disk and ``kill -9``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time

import pydicom
import requests
from fastapi.responses import JSONResponse
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.errors import InvalidDicomError

from lib.server.datastore import (
    IMAGE_ID,
    AtomicRecordFile,
    DatastoreRequestError,
    StorageError,
    check_tag,
    disk_errors_refused,
    set_aside_torn_record,
)
from lib.server.storage import FileChanges, remove_stale_temporaries, storage_problem

logger = logging.getLogger(__name__)

#: what the temporary folder's disk must take at once for a failed DICOM SEG conversion not to be put down to it
DISK_PROBE_BYTES = 1 << 20


def store_error_answer(store_url: str, exc: Exception) -> tuple[int, str]:
    """The status and message for ``exc``, raised while talking to the store at ``store_url``."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 404:
            return 404, f"the DICOMweb store {store_url} has no such study or series ({exc.request.url if exc.request else exc})"
        return 502, f"the DICOMweb store {store_url} refused the request with HTTP {status}: {exc}"
    if isinstance(exc, requests.Timeout):
        return 504, f"the DICOMweb store {store_url} did not answer in time: {exc}"
    if isinstance(exc, requests.ConnectionError):
        return 502, f"the DICOMweb store {store_url} cannot be reached (is it running?): {exc}"
    if isinstance(exc, InvalidDicomError):
        return 502, f"the DICOMweb store {store_url} sent an object that is not DICOM: {exc}"
    return 502, f"the DICOMweb store {store_url} failed: {exc}"


def install_store_error_answers(server, store_url: str) -> None:
    """Answer store failures on ``server`` (the running FastAPI app) with :func:`store_error_answer`."""

    async def answer(request, exc):
        status, message = store_error_answer(store_url, exc)
        logger.error("%s %s: %s", request.method, request.url.path, message)
        return JSONResponse({"detail": message}, status_code=status)

    for kind in (requests.RequestException, InvalidDicomError):
        server.add_exception_handler(kind, answer)
    # The middleware stack, which holds the exception handlers, was built for the startup request: rebuild it.
    server.middleware_stack = server.build_middleware_stack()
    logger.info("DICOMweb store %s: its failures are answered with 502/504 and a message naming it", store_url)


def disk_refusal(folder: str, size: int = DISK_PROBE_BYTES) -> OSError | None:
    """The error with which the disk of ``folder`` refuses ``size`` bytes now (written to an anonymous file and
    synced), or None when it takes them."""
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return None


def whole_segmentation(path: str) -> bool:
    """Whether ``path`` is a whole DICOM SEG file: readable to its end, with all the pixel data its header declares."""
    try:
        seg = pydicom.dcmread(path)
        declared = int(seg.Rows) * int(seg.Columns) * int(seg.get("NumberOfFrames", 1)) * int(seg.BitsAllocated)
        return seg.Modality == "SEG" and len(seg.PixelData) >= (declared + 7) // 8
    except Exception:  # a file cut short fails in many ways: no DICM prefix, a tag cut in two, missing pixel data
        return False


class CheckedDICOMWebDatastore(AtomicRecordFile, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore, whose label saves send the store a whole DICOM SEG or nothing, and whose
    local cache (series fetched from the store, labels, its ``datastore_v2.json``) a full disk or ``kill -9``
    cannot leave unusable:

    - MONAI Label ignores the exit status of dcmqi's ``itkimage2segimage`` and reads whatever it wrote: on a full
      temporary disk that was a 502 blaming the store ("not DICOM") or a bare 500. Here the SEG is sent only when
      it is whole; otherwise the answer is a 507 when the temporary folder's disk cannot take
      :data:`DISK_PROBE_BYTES` now (503 for another I/O error) and a 500 pointing at the log when it can; any other
      write of the conversion the disk refuses is a 507/503. Each says that nothing was stored in the store;
    - a label tag is a plain name and an image id a plain id (both are joined into cache paths);
    - the cached label is written atomically after the store has the SEG; when the disk refuses it, the old cached
      copy is removed, so that the next reader fetches the label from the store rather than a stale or cut file,
      and the save is answered as done (the store has it: a retry would store it twice), with a warning in the log;
    - the cache's record is written atomically, one found torn at start is set aside and rebuilt (MONAI Label
      refused to start), and staging files a killed server left are removed at start.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # what a server killed in the middle of a change left (only the app's own ``.NAME.XXXX.tmp`` files)
        labels_root = self._datastore.label_path(None)
        tags = [os.path.join(labels_root, d) for d in os.listdir(labels_root) if os.path.isdir(os.path.join(labels_root, d))]
        for folder in {os.path.realpath(f) for f in (self._datastore_path, *tags)}:
            remove_stale_temporaries(folder, logger, ours_only=True)

    def _init_from_datastore_file(self, throw_exception=False):
        if throw_exception:  # LocalDatastore.__init__, before it reads the record: a torn one would stop the server
            set_aside_torn_record(self._datastore_config_path, "the DICOMweb cache folder")
        super()._init_from_datastore_file(throw_exception)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, name: str | None = None) -> str:
        """As MONAI Label's (a ``final`` label goes to the store as DICOM SEG, then into the cache), with the checks
        above. ``name``, the client's file name, is not needed here."""
        check_tag(label_tag)
        if not (isinstance(image_id, str) and IMAGE_ID.match(image_id)):
            raise DatastoreRequestError(404, f"image {image_id!r} is not in the datastore")
        what = f"the {label_tag!r} label of image {image_id!r}"
        label_info = dict(label_info or {})
        image_uri = self.get_image_uri(image_id)  # the series, fetched from the store if the cache has not got it
        converted = None
        try:
            with disk_errors_refused(what, "nothing was stored in the DICOMweb store"):
                if "".join(pathlib.Path(label_filename).suffixes) == ".bin":
                    label_filename = converted = binary_to_image(image_uri, label_filename)
                if label_tag == DefaultLabelTag.FINAL:
                    label_info.update(self._store_segmentation(image_id, label_filename, label_info.get("label_info"), what))
            return self._cache_label(image_id, label_filename, label_tag, label_info, what)
        finally:
            if converted and os.path.exists(converted):
                os.remove(converted)

    def _store_segmentation(self, image_id: str, label_filename: str, segments, what: str) -> dict:
        """Convert the label to DICOM SEG and send it to the store, only if the conversion is whole; returns the info
        MONAI Label records for it."""
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        segmentation = nifti_to_dicom_seg(image_dir, label_filename, segments)
        if not segmentation:
            raise DatastoreRequestError(400, f"{what} holds no label value: a DICOM SEG needs one segment at least; nothing was stored")
        try:
            if not whole_segmentation(segmentation):
                refusal = disk_refusal(os.path.dirname(segmentation))
                problem = storage_problem(refusal, what, "nothing was stored in the DICOMweb store") if refusal else None
                if problem:
                    logger.error("%s: %s (%s)", what, problem[1], refusal)
                    raise StorageError(*problem)
                raise DatastoreRequestError(
                    500, f"{what} could not be converted to DICOM SEG (itkimage2segimage failed; the server's log says why); "
                    "nothing was stored in the DICOMweb store",
                )  # fmt: skip
            series_id = dicom_web_upload_dcm(segmentation, self._client)
        finally:
            if os.path.exists(segmentation):
                os.remove(segmentation)
        image_info = self.get_image_info(image_id)
        fields = ("Modality", "PatientID", "StudyInstanceUID")
        return {"SeriesInstanceUID": series_id, **{field: image_info.get(field) for field in fields}}

    def _cache_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, what: str) -> str:
        """MONAI Label's LocalDatastore.save_label (the cache's copy and record), written atomically. A ``final``
        label is in the store already: if the disk refuses its cached copy, the old copy is removed (the label is
        fetched from the store when needed) and the save still succeeds, with a warning in the log."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise DatastoreRequestError(404, f"image {image_id!r} is not in the datastore")
        _, extension = self._to_id(os.path.basename(label_filename))
        path = os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, extension))
        stored = label_tag == DefaultLabelTag.FINAL
        with disk_errors_refused(what), FileLock(self._lock_file):
            before, changes = obj.labels.get(label_tag), FileChanges()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                changes.put(label_filename, path)
                obj.labels[label_tag] = DataModel(info={**label_info, "ts": int(time.time()), "name": os.path.basename(path)}, ext=extension)
                self._update_datastore_file(lock=False)
            except BaseException as exc:
                changes.rollback()
                if before is None:
                    obj.labels.pop(label_tag, None)
                else:
                    obj.labels[label_tag] = before
                if not (stored and isinstance(exc, OSError)):
                    raise
                if os.path.exists(path):  # the old label: the store has the new one
                    os.remove(path)
                logger.warning(
                    "%s is stored in the DICOMweb store, but the server's cache could not take it (%s); it is fetched from "
                    "the store when needed", what, exc,
                )  # fmt: skip
                return image_id
            changes.commit()
        logger.info("saved %s%s", what, " in the DICOMweb store and its cache" if stored else " in the cache")
        return image_id
