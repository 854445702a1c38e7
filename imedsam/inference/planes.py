"""2D planes of images and volumes for the box-prompted 2D model, and masks placed back into them.

Arrays are in MONAI's loading order: a 2D PNG/JPG loads as ``(width, height[, channels])`` and a volume as
``(I, J, K)``. A plane handed to the model is ``H x W x 3`` RGB in [0, 1] with rows along ``J`` and columns
along ``I``, so a box ``[x0, y0, x1, y1]`` has ``x = i`` and ``y = j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.intensity import CT_WINDOW, intensity_rule, intensity_window
from ..data.arrays import load_image_array
from ..data.pictures import ImageReadError, is_picture

__all__ = [
    "ImageReadError",
    "NonFiniteImageError",
    "check_finite",
    "is_picture",
    "spatial_shape",
    "load_image_array",
    "CT_WINDOW",
    "intensity_window",
    "image_plane",
    "label_plane",
    "place_plane",
]


def spatial_shape(array, planar: bool) -> tuple[int, ...]:
    """Spatial shape in array order: ``(W, H)`` of a picture (its channels dropped), ``(I, J, K)`` of a volume."""
    return tuple(int(v) for v in array.shape[: 2 if planar else 3])


class NonFiniteImageError(ImageReadError):
    """An image whose plane (a picture, or the volume slice a prompt reaches) holds a NaN or infinite value."""


def check_finite(values: np.ndarray, slice_index: int | None = None, where: str = "") -> None:
    """Refuse NaN and ±inf in ``values``, naming the first one in array order (:class:`NonFiniteImageError`).

    ``values`` is in the image's array order: a picture's ``(W, H[, C])``, named ``[x, y]``, or the slice
    ``(I, J)`` of a volume at ``slice_index``, named ``[i, j, k]``. ``where`` ends the message (", on the
    prompted slice"). Integer data holds neither; it is not scanned.
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.inexact):
        return
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    index = np.unravel_index(int(np.argmax(bad)), bad.shape)  # argmax: the first True in array order
    value = values[index]
    if slice_index is None:
        raise NonFiniteImageError(f"the image has a NaN or infinite pixel at [{index[0]}, {index[1]}] (x, y; {value}){where}")
    raise NonFiniteImageError(
        f"the volume has a NaN or infinite voxel at [{index[0]}, {index[1]}, {slice_index}] (i, j, k; {value}){where}"
    )


def _volume_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ImageReadError(f"expected a 3D scalar volume (I, J, K), got shape {array.shape}")
    return array


def _planar_channels(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return array[..., :3] if array.shape[-1] == 4 else array
    raise ImageReadError(f"{what} must be grey, RGB or RGBA (1, 3 or 4 channels); got array shape {array.shape}")


def image_plane(
    array, planar: bool, slice_index: int | None = None, window: Sequence[float] | None = None, modality: str | None = None
) -> np.ndarray:
    """The ``H x W x 3`` float32 RGB plane in [0, 1] that the model sees.

    Args:
        array: the loaded image, ``(W, H[, C])`` for a 2D picture or ``(I, J, K)`` for a volume.
        planar: whether ``array`` is a 2D picture.
        slice_index: the ``K`` index for a volume.
        window: ``[low, high]`` intensities mapped to [0, 1] (e.g. ``[-160, 240]``, the abdomen CT window);
            by default 8-bit pictures use 0..255 and other data its own range (percentiles for volumes).
        modality: a volume's modality (a name or DICOM code): without ``window`` it picks the volume's rule
            (:func:`~imedsam.data.intensity.intensity_rule`: CT's window for ``ct``, the percentiles for any other,
            a guess from the values for None). Pictures ignore it.

    A NaN or infinite value in the picture or on the slice is a :class:`NonFiniteImageError` naming the first
    one (:func:`check_finite`); the rest of a volume may hold some.
    """
    array = np.asarray(array)
    if planar:
        channels = _planar_channels(array, "a 2D image")
        check_finite(channels)
        plane = channels.transpose(1, 0, 2)
        if window is None and array.dtype == np.uint8:
            low, high = 0.0, 255.0
        elif window is None:
            low, high = float(plane.min()), float(plane.max())
            high = high if high > low else low + 1.0
        else:
            low, high = intensity_window(plane, window)
    else:
        volume = _volume_array(array)
        if slice_index is None or not 0 <= slice_index < volume.shape[2]:
            raise ImageReadError(f"slice {slice_index} is not in the volume of shape {volume.shape}")
        check_finite(volume[:, :, slice_index], slice_index, ", on the prompted slice")  # as the 3D path refuses one
        low, high = intensity_window(volume, window, intensity_rule(modality))
        plane = volume[:, :, slice_index].T[..., None]
    plane = np.clip((plane.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    if not np.isfinite(plane).all():  # finite values that overflow float32 when windowed
        raise ImageReadError("the image's values cannot be scaled to [0, 1] (they overflow float32)")
    if plane.shape[-1] == 1:
        plane = np.repeat(plane, 3, axis=-1)
    return np.ascontiguousarray(plane)


def label_plane(array, planar: bool, slice_index: int | None = None) -> np.ndarray:
    """The ``H x W`` boolean foreground (``> 0``) of a label loaded like its image."""
    array = np.asarray(array)
    if planar:
        channels = _planar_channels(array, "a 2D label")
        if channels.shape[-1] > 1 and not (channels == channels[..., :1]).all():
            raise ImageReadError("a 2D label with several channels must have equal channels (a grey mask saved as RGB)")
        return channels[..., 0].T > 0
    volume = _volume_array(array)
    if slice_index is None or not 0 <= slice_index < volume.shape[2]:
        raise ImageReadError(f"slice {slice_index} is not in the label volume of shape {volume.shape}")
    return volume[:, :, slice_index].T > 0


def place_plane(plane: np.ndarray, spatial_shape: Sequence[int], slice_index: int | None = None) -> np.ndarray:
    """Put an ``H x W`` result back in the image's array order: ``(W, H)``, or ``(I, J, K)`` zeros but one slice."""
    plane = np.asarray(plane)
    if slice_index is None:
        return np.ascontiguousarray(plane.T)
    volume = np.zeros(tuple(int(s) for s in spatial_shape[:3]), dtype=plane.dtype)
    volume[:, :, slice_index] = plane.T
    return volume
