"""MONAI Label's local datastore, with checked names, checked images and labels, and changes that a crash or a
full disk cannot leave half made."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from imedsam.data.headers import ImageHeader, check_data_length, check_size, read_header
from imedsam.data.pictures import check_picture
from imedsam.inference import ImageReadError, is_picture, load_image_array, spatial_shape

from lib.server.storage import FileChanges, remove_stale_temporaries, storage_problem, write_json_atomically

logger = logging.getLogger(__name__)

#: label tags and new image ids are plain names: they become file and folder names in the datastore
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: image ids are file names without their extension (DICOM UIDs have dots), never a path
IMAGE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}$")
#: the file name endings of images and labels: the one list that uploads are checked against and the datastore
#: scans its folders for (a compound ending after its last part: MONAI Label takes the last pattern that fits)
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".seg.nrrd")
#: :data:`SUFFIXES` as the datastore's file patterns, lower and upper case
DATASTORE_PATTERNS = tuple(f"*{suffix}" for suffix in SUFFIXES) + tuple(f"*{suffix.upper()}" for suffix in SUFFIXES)
#: what an image upload may say becomes of the labels of the image it replaces
LABEL_POLICIES = ("keep", "remove")


def suffix_of(name: str) -> str | None:
    """The ending of ``name`` in :data:`SUFFIXES` (the longest that fits, any case, lower-cased), or None."""
    lower = name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


#: the most entries :func:`count_dicom_files` looks at, so that a huge studies folder does not hold up the start
DICOM_SCAN_LIMIT = 100_000


def count_dicom_files(folder: str, skip: str | None = None, limit: int = DICOM_SCAN_LIMIT) -> tuple[int, bool]:
    """The ``.dcm`` files (any case) in ``folder`` and its subfolders, ``skip`` (the labels folder) and hidden
    folders aside; and whether the count stopped at ``limit`` entries looked at."""
    skip = os.path.realpath(skip) if skip else None
    found = seen = 0
    for root, folders, files in os.walk(folder):
        folders[:] = [d for d in folders if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip]
        found += sum(1 for name in files if name.lower().endswith(".dcm"))
        seen += len(files) + len(folders)
        if seen >= limit:
            return found, True
    return found, False


def warn_about_dicom_files(folder: str, labels_folder: str | None = None) -> int:
    """Log one warning when the local studies ``folder`` holds ``.dcm`` files, which the local datastore does not
    serve (it reads :data:`SUFFIXES`, in the folder itself); returns how many were found."""
    found, stopped = count_dicom_files(folder, labels_folder)
    if found:
        logger.warning(
            "%s%d .dcm file%s in the studies folder %s %s skipped: a local studies folder serves %s files only, and "
            "DICOM is served from a DICOMweb store: e.g. Orthanc with its DICOMweb plugin, then start the server with "
            "--studies http://127.0.0.1:8042/dicom-web (the app's README, With OHIF); or convert each series to "
            "NIfTI (e.g. dcm2niix) into the studies folder",
            "at least " if stopped else "", found, "" if found == 1 else "s", os.path.normpath(folder), "is" if found == 1 else "are",
            " ".join(SUFFIXES),
        )  # fmt: skip
    return found


class DatastoreRequestError(ValueError):
    """A request the datastore refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StorageError(DatastoreRequestError):
    """A change the disk refused (507 full, 503 unavailable); nothing of it was kept."""


@contextmanager
def disk_errors_refused(what: str, outcome: str = "nothing of it was changed"):
    """A write the disk refuses in the body becomes a :class:`StorageError` (507 full, 503 otherwise) naming
    ``what`` and saying ``outcome``; it is logged with the system's own message."""
    try:
        yield
    except OSError as exc:
        problem = storage_problem(exc, what, outcome)
        if problem is None:
            raise
        logger.error("%s: %s (%s)", what, problem[1], exc)
        raise StorageError(*problem) from exc


def _named(exc: Exception, path: str, name: str) -> str:
    """``exc``'s message with the server's ``path`` replaced by the client's ``name``."""
    return str(exc).replace(os.fspath(path), name)


def _check_plain(value: str, what: str) -> str:
    if not isinstance(value, str) or not PLAIN_NAME.match(value):
        raise DatastoreRequestError(400, f"{what} {value!r} is not a plain name: use letters, digits, '_' and '-'")
    return value


def check_tag(tag: str) -> str:
    return _check_plain(tag, "label tag")


def check_new_image_id(image_id: str) -> str:
    return _check_plain(image_id, "image id")


def set_aside_torn_record(path: str, folder: str = "the studies folder") -> None:
    """Move a datastore record (``datastore_v2.json``) that cannot be read aside, to ``<path>.torn-<time>``, and say
    so in the log: MONAI Label's datastore then rebuilds the record from its ``folder`` instead of refusing to start."""
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            LocalDatastoreModel.model_validate_json(f.read())
    except (OSError, ValueError) as exc:
        aside = f"{path}.torn-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        logger.warning(
            "datastore record %s is unreadable (%s: %s); moved it to %s and rebuilding the record from %s: images and "
            "labels are kept, their stored info (scores, timestamps) is not",
            path, type(exc).__name__, first_line, aside, folder,
        )  # fmt: skip


class AtomicRecordFile:
    """For a :class:`LocalDatastore` (the app's, or the DICOMweb datastore's cache): its record ``datastore_v2.json``
    is written to a temporary file and renamed, so that a crash or a full disk leaves the old record or the new one,
    never a part (MONAI Label truncates it, then writes)."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True  # the file watcher is not to reload what is written here
            try:
                write_json_atomically(self._datastore_config_path, self._datastore.model_dump(exclude={"base_path"}))
            except BaseException:
                self._ignore_event_config = False
                raise
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


class CheckedDatastore(AtomicRecordFile, LocalDatastore):
    """:class:`LocalDatastore` that:

    - takes label tags and new image ids only as plain names (a tag or id is joined into a path, so
      ``../x`` or ``/abs`` would write outside the studies folder);
    - answers an image id that is not in the datastore the same way whether or not a file of that name
      exists anywhere;
    - scans for, and takes uploads of, the same file endings (:data:`SUFFIXES`);
    - checks an image before storing it: a picture or volume whose header is readable and within the size
      limits, a picture PIL can verify, a NIfTI file as long as its header says; an image that has labels is
      replaced only when the caller says what becomes of them (``labels``: ``keep``, each must fit the new
      image, or ``remove``), else 409;
    - checks a label before storing it: its header (shape, type) against its image's header before any voxel
      is decoded, then readable, holding only background (0) and the app's label values;
    - changes a file and the record (``datastore_v2.json``) together or not at all: files are written
      atomically (temporary file, then rename), the old versions are kept until the record is written, and a
      failure puts files and record back as they were; a full disk is a :class:`StorageError` (507, 503 for
      other I/O errors) naming what could not be written;
    - starts from a torn ``datastore_v2.json`` by moving it aside and rebuilding the record from the
      studies folder (images and labels are files there, so no label is lost), and says so in the log.

    Messages name an upload by the client's file name (``name``), never by a server path.
    """

    def __init__(self, studies: str, label_values: dict[str, int], **kwargs) -> None:
        self.label_values = dict(label_values)
        kwargs.setdefault("extensions", DATASTORE_PATTERNS)
        set_aside_torn_record(os.path.join(studies, kwargs.get("datastore_config", "datastore_v2.json")))
        super().__init__(studies, **kwargs)
        # what a server killed in the middle of a change left (only the app's own ``.NAME.XXXX.tmp`` files)
        labels_root = self._datastore.label_path(None)
        tags = [os.path.join(labels_root, d) for d in os.listdir(labels_root) if os.path.isdir(os.path.join(labels_root, d))]
        for folder in {os.path.realpath(f) for f in (self._datastore_path, self._datastore.image_path(), *tags)}:
            remove_stale_temporaries(folder, logger, ours_only=True)
        warn_about_dicom_files(self._datastore.image_path(), labels_root)

    # -- names --------------------------------------------------------------------------------------------
    def image_uri_or_404(self, image_id: str) -> str:
        """The image's path, or a 404 that does not tell whether a file of that name exists elsewhere."""
        uri = self.get_image_uri(image_id) if isinstance(image_id, str) and IMAGE_ID.match(image_id) else ""
        if not uri:
            raise DatastoreRequestError(404, f"image {image_id!r} is not in the datastore")
        return uri

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_tag(label_tag)
        self.image_uri_or_404(label_id)
        super().remove_label(label_id, label_tag)

    # -- changes ------------------------------------------------------------------------------------------
    @contextmanager
    def _changing(self, image_id: str, what: str):
        """Hold the datastore's lock while the body changes files (through the :class:`FileChanges` it gets)
        and the record of ``image_id``: if it fails, the files and the record are put back, and a disk error
        is a :class:`StorageError` naming ``what``."""
        with disk_errors_refused(what), FileLock(self._lock_file):
            before = copy.deepcopy(self._datastore.objects.get(image_id))
            changes = FileChanges()
            try:
                yield changes
            except BaseException:
                changes.rollback()
                if before is None:
                    self._datastore.objects.pop(image_id, None)
                else:
                    self._datastore.objects[image_id] = before
                raise
            changes.commit()

    # -- images -------------------------------------------------------------------------------------------
    def check_image_file(self, path: str, name: str | None = None) -> ImageHeader:
        """Refuse (400) an image whose header cannot be read or is above the size limits, a picture PIL cannot
        verify and a NIfTI file shorter than its header says; all without decoding a voxel."""
        name = name or os.path.basename(path)
        try:
            header = read_header(path, name)
            check_size(header, name)
            if header.planar:
                check_picture(path)  # PNG chunk checksums and structure; nothing is decoded
            else:
                check_data_length(path, header, name)
        except ImageReadError as exc:
            raise DatastoreRequestError(400, f"the image cannot be stored: {_named(exc, path, name)}") from None
        return header

    def add_image(
        self, image_id: str, image_filename: str, image_info: dict[str, Any], labels: str | None = None, name: str | None = None
    ) -> str:
        """Store ``image_filename`` as ``image_id`` (default: from ``name``, the client's file name): checked
        (:meth:`check_image_file`), written atomically, with the record. Replacing an image that has labels
        needs ``labels`` (:data:`LABEL_POLICIES`), else 409."""
        name = name or os.path.basename(image_filename)
        if suffix_of(name) is None or suffix_of(os.path.basename(image_filename)) != suffix_of(name):
            raise DatastoreRequestError(400, f"the image file {name!r} is not one of {', '.join(SUFFIXES)}")
        image_id = check_new_image_id(image_id or self._to_id(name)[0])
        if labels not in (None, *LABEL_POLICIES):
            raise DatastoreRequestError(400, f"labels must be one of {', '.join(LABEL_POLICIES)}, got {labels!r}")
        header = self.check_image_file(image_filename, name)
        _, extension = self._to_id(os.path.basename(image_filename))
        image_folder = self._datastore.image_path()
        with self._changing(image_id, f"image {image_id!r}") as changes:
            obj = self._datastore.objects.get(image_id)
            tags = sorted(obj.labels) if obj else []
            if tags and labels is None:
                raise DatastoreRequestError(
                    409,
                    f"image {image_id!r} has labels (tags: {', '.join(tags)}); to replace it, say what becomes of them: "
                    "labels=keep (they stay, if each fits the new image) or labels=remove (they are deleted with the old image)",
                )
            if tags and labels == "keep":
                for tag in tags:
                    problem = self._label_misfit(self._stored_label_header(image_id, tag), header)
                    if problem:
                        raise DatastoreRequestError(
                            409, f"the {tag!r} label of image {image_id!r} does not fit the new image ({problem}): send labels=remove"
                        )
            changes.put(image_filename, os.path.join(image_folder, self._filename(image_id, extension)))
            if obj and obj.image.ext != extension:  # the same image stored before in another format
                changes.remove(os.path.join(image_folder, self._filename(image_id, obj.image.ext)))
            kept = {}
            for tag in tags:
                if labels == "remove":
                    changes.remove(self.get_label_uri(image_id, tag))
                else:
                    kept[tag] = obj.labels[tag]
            info = {**(image_info or {}), "ts": int(time.time()), "name": self._filename(image_id, extension)}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension), labels=kept)
            self._update_datastore_file(lock=False)
        logger.info("stored image %s%s", image_id, f" (labels: {labels})" if tags else "")
        return image_id

    # -- labels -------------------------------------------------------------------------------------------
    def _stored_header(self, path: str, what: str) -> ImageHeader:
        name = os.path.basename(path)
        try:
            header = read_header(path, name)
            check_size(header, name)
        except ImageReadError as exc:
            raise DatastoreRequestError(409, f"{what} in the datastore cannot be used: {_named(exc, path, name)}") from None
        return header

    def _stored_label_header(self, image_id: str, tag: str) -> ImageHeader:
        return self._stored_header(self.get_label_uri(image_id, tag), f"the {tag!r} label of image {image_id!r}")

    @staticmethod
    def _label_misfit(label: ImageHeader, image: ImageHeader) -> str | None:
        """What keeps a label of header ``label`` from fitting an image of header ``image``, or None."""
        if label.planar != image.planar:
            return "a 2D picture and a volume"
        if label.spatial != image.spatial:
            return f"shape {label.shape} against {image.spatial}"
        if not label.planar and math.prod(label.shape[3:]) != 1:
            return f"shape {label.shape}: a label has one value per voxel"
        return None

    def check_label(self, image_id: str, label_filename: str, name: str | None = None) -> ImageHeader:
        """Refuse (400) a label that cannot be read, does not have its image's shape or holds other values. The
        shape is compared from both headers before any voxel is decoded, so the decode is bounded by the image's
        size. Returns the image's header."""
        name = name or os.path.basename(label_filename)
        image_uri = self.image_uri_or_404(image_id)
        planar = is_picture(image_uri)
        if is_picture(label_filename) != planar:
            kind = "a 2D picture" if planar else "a volume"
            raise DatastoreRequestError(400, f"image {image_id!r} is {kind}; the label must be one too (got {name})")
        image = self._stored_header(image_uri, f"image {image_id!r}")
        try:
            header = read_header(label_filename, name)
        except ImageReadError as exc:
            raise DatastoreRequestError(400, f"the label cannot be read: {_named(exc, label_filename, name)}") from None
        if header.spatial != image.spatial:
            raise DatastoreRequestError(400, f"the label has shape {header.shape}; its image {image_id!r} has {image.spatial}")
        problem = self._label_misfit(header, image)
        if problem:
            raise DatastoreRequestError(400, f"the label does not fit its image {image_id!r}: {problem}")
        try:
            label = np.asarray(load_image_array(label_filename))  # as many voxels as the image, at most 4 channels
        except ImageReadError as exc:
            raise DatastoreRequestError(400, f"the label cannot be read: {_named(exc, label_filename, name)}") from None
        if spatial_shape(label, planar) != image.spatial:
            raise DatastoreRequestError(400, f"the label has shape {label.shape}; its image {image_id!r} has {image.spatial}")
        if planar and label.ndim == 3:  # a grey label saved with several equal channels
            if not (label == label[..., :1]).all():
                raise DatastoreRequestError(400, "the label is a colour picture; a label has one channel of label values")
            label = label[..., 0]
        allowed = {0, *self.label_values.values()}
        values = np.unique(label)
        unexpected = [v.item() for v in values if v not in allowed]
        if unexpected:
            raise DatastoreRequestError(
                400, f"the label holds values {unexpected[:10]} that are not label values: 0 (background) and {self.label_values}"
            )
        return image

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], name: str | None = None
    ) -> str:
        """Check the label (:meth:`check_label`), then store it and its record together, or neither."""
        check_tag(label_tag)
        image = self.check_label(image_id, label_filename, name)
        _, extension = self._to_id(os.path.basename(label_filename))
        label_folder = self._datastore.label_path(label_tag)
        file_name = self._filename(image_id, extension)
        with self._changing(image_id, f"the {label_tag!r} label of image {image_id!r}") as changes:
            image_uri = self.image_uri_or_404(image_id)  # still there, and still the image the label was checked with
            if self._stored_header(image_uri, f"image {image_id!r}").spatial != image.spatial:
                raise DatastoreRequestError(409, f"image {image_id!r} was replaced while its label was checked; send the label again")
            obj = self._datastore.objects[image_id]
            os.makedirs(label_folder, exist_ok=True)
            changes.put(label_filename, os.path.join(label_folder, file_name))
            previous = obj.labels.get(label_tag)
            if previous is not None and previous.ext != extension:  # the same label saved before in another format
                changes.remove(os.path.join(label_folder, self._filename(image_id, previous.ext)))
            info = {**(label_info or {}), "ts": int(time.time()), "name": file_name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s (tag %s) for image %s", file_name, label_tag, image_id)
        return image_id
