"""Reading an image file (a picture or a volume) as an array, in MONAI's loading order."""

from __future__ import annotations

import functools
import os

import numpy as np

from .pictures import ImageReadError, check_picture, check_pixel_count, is_picture

__all__ = ["cached_image_array", "load_image_array", "read_picture_array"]


def load_image_array(path: str):
    """Load ``path`` with MONAI in array order and its own dtype (so 8-bit pictures are known as such).

    Returns a ``MetaTensor``; its ``.affine`` is kept for volumes.
    """
    from monai.transforms import LoadImage

    if not path or not os.path.exists(path):
        raise ImageReadError(f"image not found: {path!r}")
    planar = is_picture(path)
    if planar:
        # MONAI falls back on every other reader when PIL fails; checking first keeps the message to the point.
        check_picture(path)
    elif str(path).lower().endswith((".nii", ".nii.gz")):
        _check_nifti_plane_size(path)
    try:
        return LoadImage(reader="PILReader" if planar else None, image_only=True, dtype=None)(path)
    except Exception as exc:  # readers raise many types for corrupt or foreign files
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ImageReadError(f"could not read image {path}: {type(exc).__name__}: {first_line}") from exc


def _check_nifti_plane_size(path: str) -> None:
    """Refuse a NIfTI volume whose planes exceed the pixel limit, from its header, before reading the voxels."""
    import nibabel

    try:
        shape = nibabel.load(path).shape  # reads the header only
    except Exception as exc:  # nibabel raises several types for a corrupt or foreign file
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ImageReadError(f"could not read image {path}: {type(exc).__name__}: {first_line}") from exc
    if len(shape) >= 2:
        check_pixel_count(shape[0], shape[1], path)


def read_picture_array(path: str) -> np.ndarray:
    """``C x H x W`` float32, as ``LoadImaged(reader=PILReader, reverse_indexing=False, ensure_channel_first=True)``."""
    from monai.transforms import LoadImage

    if not os.path.isfile(path):
        raise ImageReadError(f"image not found: {path!r}")
    check_picture(path)
    try:
        array = LoadImage(reader="PILReader", reverse_indexing=False, ensure_channel_first=True, image_only=True)(path)
    except Exception as exc:  # readers raise many types for corrupt files
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ImageReadError(f"could not read image {path}: {type(exc).__name__}: {first_line}") from exc
    return np.asarray(array, dtype=np.float32)


@functools.lru_cache(maxsize=16)
def cached_image_array(path: str, planar: bool) -> np.ndarray:
    """A read-only array of ``path``, decoded once per process: ``(I, J, K)`` of a volume (its own dtype), ``C x H x W``
    of a picture. The cache holds the 16 latest files (the volumes and the one-image sets)."""
    if planar:
        array = read_picture_array(path)
    else:
        array = np.asarray(load_image_array(path))
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 3:
            raise ImageReadError(f"{path}: expected a 3D scalar volume (I, J, K), got shape {array.shape}")
    array.setflags(write=False)
    return array
