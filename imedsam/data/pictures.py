"""Reading 2D picture files (PNG, JPEG, BMP, TIFF): one reader and one check, with errors that name the file."""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageReadError", "check_picture", "check_pixel_count", "is_picture", "read_picture"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: the largest image (or volume plane) read, in pixels: 50 MP, a 7000 x 7000 picture. Larger ones are refused
#: before they are decoded, so a huge or forged file cannot exhaust memory. The CLI's ``--max-pixels`` and the
#: label app's ``--conf max_image_pixels`` change it, as ``PIL.Image.MAX_IMAGE_PIXELS`` does PIL's.
MAX_IMAGE_PIXELS = 50_000_000

# PIL raises these for files it cannot decode; SyntaxError comes from some truncated PNG headers and
# DecompressionBombError from files whose header claims far more pixels than PIL's safety limit.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """An image or label that cannot be read, or whose shape the model cannot use."""


def check_pixel_count(width: int, height: int, path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """Refuse an image of more than ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) pixels, naming the limit."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise ImageReadError(
            f"image {os.fspath(path)} is {width} x {height} = {width * height:,} pixels, above the limit of {limit:,} "
            "pixels (the CLI's --max-pixels, the label app's --conf max_image_pixels)"
        )


def is_picture(path: str | os.PathLike) -> bool:
    """True for 2D picture formats (PNG, JPG, ...); NIfTI, NRRD and DICOM series are volumes."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _open(path: str | os.PathLike, what: str, max_pixels: int | None, finish) -> Image.Image:
    if not os.path.isfile(path):
        raise ImageReadError(f"{what} not found: {os.fspath(path)!r}")
    try:
        with Image.open(path) as picture:
            check_pixel_count(*picture.size, path, max_pixels)  # from the header, before any pixel is decoded
            finish(picture)
            return picture
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, raised by open() itself, above ours
        limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        raise ImageReadError(f"{what} {os.fspath(path)} is too large to decode ({exc}); the limit here is {limit:,} pixels") from exc
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"could not read {what} {os.fspath(path)}: {exc}") from exc


def read_picture(path: str | os.PathLike, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open and decode ``path``; a missing, undecodable or too large (``max_pixels``, default
    :data:`MAX_IMAGE_PIXELS`) file is an :class:`ImageReadError` that names it (``what``: "image", "mask",
    "label map", ... in the message)."""
    return _open(path, what, max_pixels, lambda picture: picture.load())


def check_picture(path: str | os.PathLike, what: str = "image", max_pixels: int | None = None) -> None:
    """Check that ``path`` is a picture file PIL can read and not too large, from its structure, without
    decoding the pixels."""
    _open(path, what, max_pixels, lambda picture: picture.verify())
