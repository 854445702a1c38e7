"""The imaging modality of a request's image: what a model with a modality prompt (MCP-MedSAM) is told.

In order: the request's ``modality`` field, else the modality the image carries (its datastore info, or the DICOM
``Modality`` tag of a DICOM series), else the app's ``--conf modality``, else None (the model's "any" token).
Names and DICOM codes are read by :func:`imedsam.data.normalize_modality`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from monai.transforms import Transform

from imedsam.data import normalize_modality

logger = logging.getLogger(__name__)

#: the request key the app fills with the image's own code from its datastore info (lib.main: IMedSAMApp.infer)
IMAGE_CODE_KEY = "image_modality"
#: the key :class:`ResolveModalityd` writes the request's modality to (a name, or None)
MODALITY_KEY = "resolved_modality"

#: the datastore image-info keys that hold an image's modality: ``modality`` (set by a client through MONAI Label's
#: ``PUT /datastore/image/info``) and ``Modality`` (the DICOM tag the DICOMweb datastore records)
INFO_KEYS = ("modality", "Modality")
#: what MONAI Label's DICOMweb datastore records for a missing tag
_MISSING = ("", "UNK")

# the image codes already warned about: a server prompting a series of an unknown modality warns once, not per click
_warned: set[str] = set()


class ModalityRequestError(ValueError):
    """A request's ``modality`` that is no modality name or DICOM code; answered with a 400 naming it."""

    status = 400


def request_modality(value: Any) -> str | None:
    """The request's ``modality`` field as a name of :data:`imedsam.data.MODALITIES` (None when absent or empty);
    anything else is a :class:`ModalityRequestError` naming the value and the accepted names."""
    try:
        return normalize_modality(value)
    except ValueError as exc:
        raise ModalityRequestError(f"modality: {exc}") from None


def dicom_series_modality(path: str | None) -> str | None:
    """The ``Modality`` tag of the first DICOM file (in name order) of ``path``, a DICOM series folder (what MONAI
    Label's DICOMweb datastore serves when it does not convert series to NIfTI); None for a file, a folder
    without a readable tag, or no path. Only the header of one file is read."""
    if not path or not os.path.isdir(path):
        return None
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            header = dcmread(file, stop_before_pixels=True, specific_tags=["Modality"])
        except (InvalidDicomError, OSError):
            continue  # a stray non-DICOM file in the series folder
        code = str(header.get("Modality", "") or "").strip()
        if code:
            return code
    return None


def image_modality_code(info: Mapping[str, Any] | None, path: str | None = None) -> str | None:
    """The modality code the image carries, unchecked: its datastore info's ``modality`` or ``Modality``
    (MONAI Label's ``"UNK"`` is no code), else the DICOM tag of a series folder at ``path``; None for a picture or
    NIfTI volume with no such info."""
    for key in INFO_KEYS:
        value = (info or {}).get(key)
        if isinstance(value, str) and value.strip() not in _MISSING:
            return value.strip()
    return dicom_series_modality(path)


def image_modality(code: str | None) -> str | None:
    """The modality name of an image's own code (see :func:`image_modality_code`). A code outside the known
    names and DICOM codes (``OT``, ``SC``, ...) is no modality the model knows: None (the "any" token), with one
    logged warning per code."""
    try:
        return normalize_modality(code)
    except ValueError:
        if code not in _warned:
            _warned.add(code)
            logger.warning("image modality %r is not one the model knows: its prompts use the 'any' modality", code)
        return None


def resolve_modality(requested: Any, image_code: str | None, conf_modality: str | None) -> str | None:
    """The modality for a request: ``requested`` (the request's field; a bad one is a
    :class:`ModalityRequestError`), else the image's own ``image_code`` (an unknown one gives None, see
    :func:`image_modality`), else ``conf_modality`` (the app's ``--conf modality``, already checked), else None."""
    name = request_modality(requested)
    if name is not None:
        return name
    if image_code:
        return image_modality(image_code)
    return conf_modality


class ResolveModalityd(Transform):
    """``data[MODALITY_KEY]``: the modality of a request (:func:`resolve_modality`) from its ``modality`` field,
    the image's own code (``data[IMAGE_CODE_KEY]``, else the DICOM tag of a series folder at ``image_path`` or
    ``image``) and ``conf_modality``."""

    def __init__(self, conf_modality: str | None = None) -> None:
        self.conf_modality = normalize_modality(conf_modality)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        path = d.get("image_path") or d.get("image")
        code = d.get(IMAGE_CODE_KEY) or dicom_series_modality(path if isinstance(path, str) else None)
        d[MODALITY_KEY] = resolve_modality(d.get("modality"), code, self.conf_modality)
        return d
