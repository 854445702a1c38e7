"""Reading 2D picture files (PNG, JPEG, BMP, TIFF): one reader and one check, with errors that name the file."""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "check_picture", "is_picture", "read_picture"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# PIL raises these for files it cannot decode; SyntaxError comes from some truncated PNG headers and
# DecompressionBombError from files whose header claims far more pixels than PIL's safety limit.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """An image or label that cannot be read, or whose shape the model cannot use."""


def is_picture(path: str | os.PathLike) -> bool:
    """True for 2D picture formats (PNG, JPG, ...); NIfTI, NRRD and DICOM series are volumes."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def read_picture(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open and decode ``path``; a missing or undecodable file is an :class:`ImageReadError` that names it
    (``what``: "image", "mask", "label map", ... in the message)."""
    if not os.path.isfile(path):
        raise ImageReadError(f"{what} not found: {os.fspath(path)!r}")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"could not read {what} {os.fspath(path)}: {exc}") from exc


def check_picture(path: str | os.PathLike, what: str = "image") -> None:
    """Check that ``path`` is a picture file PIL can read, from its structure, without decoding the pixels."""
    if not os.path.isfile(path):
        raise ImageReadError(f"{what} not found: {os.fspath(path)!r}")
    try:
        with Image.open(path) as picture:
            picture.verify()
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"could not read {what} {os.fspath(path)}: {exc}") from exc
