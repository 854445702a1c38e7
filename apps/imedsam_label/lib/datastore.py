"""MONAI Label's local datastore, with checked names, checked labels and files that a crash cannot tear."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel

from imedsam.inference import ImageReadError, is_picture, load_image_array, spatial_shape

from lib.storage import copy_atomically, write_json_atomically

logger = logging.getLogger(__name__)

#: label tags and new image ids are plain names: they become file and folder names in the datastore
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
#: image ids are file names without their extension (DICOM UIDs have dots), never a path
IMAGE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}$")


class DatastoreRequestError(ValueError):
    """A request the datastore refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _check_plain(value: str, what: str) -> str:
    if not isinstance(value, str) or not PLAIN_NAME.match(value):
        raise DatastoreRequestError(400, f"{what} {value!r} is not a plain name: use letters, digits, '_' and '-'")
    return value


def check_tag(tag: str) -> str:
    return _check_plain(tag, "label tag")


def check_new_image_id(image_id: str) -> str:
    return _check_plain(image_id, "image id")


class CheckedDatastore(LocalDatastore):
    """:class:`LocalDatastore` that:

    - takes label tags and new image ids only as plain names (a tag or id is joined into a path, so
      ``../x`` or ``/abs`` would write outside the studies folder);
    - answers an image id that is not in the datastore the same way whether or not a file of that name
      exists anywhere;
    - checks a label before storing it: readable, of its image's shape, holding only background (0) and
      the app's label values; nothing of a refused label is stored;
    - writes labels and ``datastore_v2.json`` atomically (temporary file, then rename);
    - starts from a torn ``datastore_v2.json`` by moving it aside and rebuilding the record from the
      studies folder (images and labels are files there, so no label is lost), and says so in the log.
    """

    def __init__(self, studies: str, label_values: dict[str, int], **kwargs) -> None:
        self.label_values = dict(label_values)
        self._set_aside_torn_record(os.path.join(studies, kwargs.get("datastore_config", "datastore_v2.json")))
        super().__init__(studies, **kwargs)

    @staticmethod
    def _set_aside_torn_record(path: str) -> None:
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
                "datastore record %s is unreadable (%s: %s); moved it to %s and rebuilding the record from the studies "
                "folder: images and labels are kept, their stored info (scores, timestamps) is not",
                path, type(exc).__name__, first_line, aside,
            )  # fmt: skip

    # -- names --------------------------------------------------------------------------------------------
    def image_uri_or_404(self, image_id: str) -> str:
        """The image's path, or a 404 that does not tell whether a file of that name exists elsewhere."""
        uri = self.get_image_uri(image_id) if isinstance(image_id, str) and IMAGE_ID.match(image_id) else ""
        if not uri:
            raise DatastoreRequestError(404, f"image {image_id!r} is not in the datastore")
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        return super().add_image(check_new_image_id(image_id), image_filename, image_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_tag(label_tag)
        self.image_uri_or_404(label_id)
        super().remove_label(label_id, label_tag)

    # -- labels -------------------------------------------------------------------------------------------
    def check_label(self, image_id: str, label_filename: str) -> None:
        """Refuse (400) a label that cannot be read, does not have its image's shape or holds other values."""
        image_uri = self.image_uri_or_404(image_id)
        planar = is_picture(image_uri)
        if is_picture(label_filename) != planar:
            kind = "a 2D picture" if planar else "a volume"
            raise DatastoreRequestError(400, f"image {image_id!r} is {kind}; the label must be one too (got {os.path.basename(label_filename)})")
        try:
            label = np.asarray(load_image_array(label_filename))
            expected = spatial_shape(load_image_array(image_uri), planar)
        except ImageReadError as exc:
            raise DatastoreRequestError(400, f"the label cannot be read: {exc}") from exc
        if spatial_shape(label, planar) != expected:
            raise DatastoreRequestError(400, f"the label has shape {label.shape}; its image {image_id!r} has {expected}")
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

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_tag(label_tag)
        self.check_label(image_id, label_filename)
        obj = self._datastore.objects[image_id]
        _, extension = self._to_id(os.path.basename(label_filename))
        label_folder = self._datastore.label_path(label_tag)
        name = self._filename(image_id, extension)
        with FileLock(self._lock_file):
            copy_atomically(label_filename, os.path.join(label_folder, name))
            previous = obj.labels.get(label_tag)
            if previous is not None and previous.ext != extension:  # the same label saved before in another format
                stale = os.path.join(label_folder, self._filename(image_id, previous.ext))
                if os.path.exists(stale):
                    os.remove(stale)
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        logger.info("saved label %s (tag %s) for image %s", name, label_tag, image_id)
        return image_id

    # -- the record file ----------------------------------------------------------------------------------
    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            write_json_atomically(self._datastore_config_path, self._datastore.model_dump(exclude={"base_path"}))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
