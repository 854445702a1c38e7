"""An image file's header (shape and data type) read without decoding a pixel or voxel, and the size limits
checked against it, so that a file whose header claims a huge image is refused before anything is decoded.

Shapes are in the order MONAI's ``LoadImage`` gives the array: ``(width, height[, channels])`` for a picture,
``(I, J, K[, ...])`` for a volume. Messages name the file as the caller calls it (``name``: the client's file
name for an upload), never a server path.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import pictures
from .pictures import ImageReadError, check_pixel_count, is_picture

__all__ = [
    "MAX_IMAGE_VOXELS",
    "VOLUME_SUFFIXES",
    "ImageHeader",
    "check_data_length",
    "check_size",
    "read_header",
]

#: the largest volume read, in voxels: 512 x 512 x 1024 (512 MiB as 16-bit integers, 1 GiB as float32). Larger
#: ones are refused from their header, before any voxel is decoded. The label app's ``--conf max_image_voxels``
#: changes it.
MAX_IMAGE_VOXELS = 512 * 512 * 1024

#: volume formats whose header is read here
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")

# PIL modes to the dtype MONAI's PILReader gives (wider where PIL widens: 16-bit greys load as int32)
_PICTURE_DTYPES = {"1": np.bool_, "I;16": np.int32, "I;16B": np.int32, "I;16L": np.int32, "I": np.int32, "F": np.float32}


class ImageHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    planar: bool

    @property
    def spatial(self) -> tuple[int, ...]:
        """``(W, H)`` of a picture, ``(I, J, K)`` of a volume."""
        return self.shape[: 2 if self.planar else 3]

    @property
    def elements(self) -> int:
        """Values the decoded array holds (voxels times channels)."""
        return math.prod(self.shape)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _without_path(text: str, path: str, name: str) -> str:
    return text.replace(os.fspath(path), name)


def read_header(path: str | os.PathLike, name: str | None = None) -> ImageHeader:
    """The shape and dtype of the picture (PNG, JPEG, BMP, TIFF), NIfTI or NRRD file ``path``, from its header:
    no pixel or voxel is decoded. An unreadable file, or another format, is an :class:`ImageReadError` that
    names it as ``name`` (default: the file's base name)."""
    path = os.fspath(path)
    name = name or os.path.basename(path)
    lower = path.lower()
    try:
        if is_picture(path):
            with Image.open(path) as picture:  # reads the header; pixels are decoded on load(), never here
                width, height = picture.size
                bands = len(picture.getbands())
                dtype = np.dtype(_PICTURE_DTYPES.get(picture.mode, np.uint8))
            return ImageHeader((width, height) if bands == 1 else (width, height, bands), dtype, True)
        if lower.endswith((".nii", ".nii.gz")):
            import nibabel

            header = nibabel.load(path).header  # the data stays on disk (a lazy proxy)
            return ImageHeader(tuple(int(v) for v in header.get_data_shape()), np.dtype(header.get_data_dtype()), False)
        if lower.endswith(".nrrd"):
            import nrrd
            from nrrd.reader import _determine_datatype

            header = nrrd.read_header(path)
            return ImageHeader(tuple(int(v) for v in header["sizes"]), np.dtype(_determine_datatype(header)), False)
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, raised by open() itself
        raise ImageReadError(f"{name} is too large to decode ({_without_path(_first_line(exc), path, name)})") from None
    except Exception as exc:  # the readers raise many types for corrupt or foreign files
        raise ImageReadError(f"could not read {name}: {type(exc).__name__}: {_without_path(_first_line(exc), path, name)}") from None
    raise ImageReadError(f"{name} is not a picture ({', '.join(pictures.IMAGE_EXTENSIONS)}) or a volume ({', '.join(VOLUME_SUFFIXES)})")


def check_size(header: ImageHeader, name: str, max_pixels: int | None = None, max_voxels: int | None = None) -> None:
    """Refuse (:class:`ImageReadError`) a header whose image exceeds the limits: a picture's or a volume plane's
    pixels (:data:`~imedsam.data.pictures.MAX_IMAGE_PIXELS`) and a volume's voxels (:data:`MAX_IMAGE_VOXELS`)."""
    if any(v < 1 for v in header.shape):
        raise ImageReadError(f"{name} has shape {header.shape}: an image has no empty axis")
    if header.planar:
        check_pixel_count(header.shape[0], header.shape[1], name, max_pixels)
        return
    if len(header.shape) < 3 or math.prod(header.shape[3:]) != 1:
        raise ImageReadError(f"{name} has shape {header.shape}; a volume is 3D (I, J, K) with one value per voxel")
    check_pixel_count(header.shape[0], header.shape[1], name, max_pixels)
    limit = MAX_IMAGE_VOXELS if max_voxels is None else max_voxels
    voxels = math.prod(header.spatial)
    if voxels > limit:
        size = " x ".join(str(v) for v in header.spatial)
        raise ImageReadError(
            f"volume {name} is {size} = {voxels:,} voxels, above the limit of {limit:,} voxels (the label app's "
            "--conf max_image_voxels)"
        )


def check_data_length(path: str | os.PathLike, header: ImageHeader, name: str | None = None) -> None:
    """Refuse a NIfTI file that holds fewer bytes of voxels than its header promises (a cut upload or copy). A
    gzip file is decompressed as a stream in constant memory, up to the bytes it must hold. Other formats are
    left to their reader."""
    path = os.fspath(path)
    name = name or os.path.basename(path)
    lower = path.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return
    import nibabel

    try:
        offset = int(nibabel.load(path).header.get_data_offset())
    except Exception as exc:
        raise ImageReadError(f"could not read {name}: {type(exc).__name__}: {_without_path(_first_line(exc), path, name)}") from None
    needed = offset + header.elements * header.dtype.itemsize
    if lower.endswith(".nii"):
        have = os.path.getsize(path)
    else:
        have = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 20):
                    have += len(chunk)
                    if have >= needed:
                        break
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageReadError(f"could not read {name}: the gzip stream is corrupt or cut ({_first_line(exc)})") from None
    if have < needed:
        raise ImageReadError(f"{name} is cut short: its header promises {needed:,} bytes, the file holds {have:,}")
