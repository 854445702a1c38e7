"""Box prompts from interactive clients: a request's ``box``, a 3D Slicer ``roi``, or two clicks as corners.

Coordinates are MONAI array indices of the loaded image, as 3D Slicer (IJK) and OHIF (``worldToIndex``)
send them: ``i`` runs along the first array axis, which is the image's x (column) for a 2D PNG/JPG loaded by
MONAI and the volume's first axis for NIfTI/DICOM. A box is returned as pixel edges ``[x0, y0, x1, y1]``
with ``x = i`` and ``y = j``, the convention of :func:`imedsam.data.box_from_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["PromptError", "BoxPrompt", "ROI_LAYOUTS", "resolve_box_prompt", "normalize_roi", "roi_to_box3d"]


class PromptError(ValueError):
    """A prompt that cannot be turned into a box on the image; the message says what is wrong."""


class BoxPrompt(NamedTuple):
    box: np.ndarray  # [x0, y0, x1, y1] float32, pixel edges, clipped to the image
    slice_index: int | None  # the slice of a volume (third array axis); None for a 2D image
    source: str  # "box", "roi" or "clicks"


def _numbers(value, name: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PromptError(f"{name} must be a list of numbers, got {value!r}")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be a list of numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise PromptError(f"{name} contains NaN or infinite values: {value!r}")
    return numbers


def normalize_roi(roi) -> tuple[list[float], list[float], tuple[float, float] | None]:
    """``(i_range, j_range, k_range or None)`` from a ``roi`` in either layout clients send.

    - 6 values: 3D Slicer's per-axis pairs ``[i_a, i_b, j_a, j_b, k_a, k_b]`` (voxel indices, inclusive,
      in any order, since the RAS to IJK mapping can flip an axis);
    - 4 values: ``[i0, j0, i1, j1]`` corners (inclusive voxel indices, in any order).
    """
    values = _numbers(roi, "roi")
    if len(values) == 6:
        i_a, i_b, j_a, j_b, k_a, k_b = values
        return sorted((i_a, i_b)), sorted((j_a, j_b)), tuple(sorted((k_a, k_b)))
    if len(values) == 4:
        i_a, j_a, i_b, j_b = values
        return sorted((i_a, i_b)), sorted((j_a, j_b)), None
    raise PromptError(
        f"roi must have 6 values [i0, i1, j0, j1, k0, k1] (3D Slicer) or 4 values [i0, j0, i1, j1], got {len(values)}"
    )


ROI_LAYOUTS = ("slicer", "corners")


def roi_to_box3d(roi: Sequence[float], shape: Sequence[int], layout: str | None = None) -> list[float]:
    """``[x0, y0, z0, x1, y1, z1]`` (exclusive upper bounds) from a 6-value ``roi`` in either form clients send.

    - 3D Slicer's interleaved per-axis pairs ``[i_a, i_b, j_a, j_b, k_a, k_b]`` (inclusive voxel indices, each
      pair in any order, since the RAS to IJK mapping can flip an axis);
    - corners ``[i0, j0, k0, i1, j1, k1]`` (inclusive, ``i0 <= i1``, ``j0 <= j1``, ``k0 <= k1``).

    They are told apart by which reading lies inside the volume with every lower bound at or below its upper
    one. Read both ways, ``[a, b, c, d, e, f]`` gives the i-range ``{a, b}`` or ``{a, d}``: when only one reading
    fits the volume, it is taken; when both fit and they differ, the request is refused, naming both boxes, and
    the client says which with ``layout`` (``"slicer"`` or ``"corners"``) or sends a ``box3d``.
    """
    if layout not in (None, *ROI_LAYOUTS):
        raise PromptError(f"roi_layout must be one of {ROI_LAYOUTS}, got {layout!r}")
    if len(shape) != 3:
        raise PromptError(f"a 6-value roi needs a 3D volume (I, J, K), got spatial shape {tuple(shape)}")
    width, height, depth = (int(v) for v in shape)
    values = _numbers(roi, "roi")
    if len(values) != 6:
        raise PromptError(f"roi must have 6 values, got {len(values)}")
    a, b, c, d, e, f = values

    def fits(box):
        x0, y0, z0, x1, y1, z1 = box
        return 0 <= x0 <= x1 < width + 0.5 and 0 <= y0 <= y1 < height + 0.5 and 0 <= z0 <= z1 < depth + 0.5

    interleaved = [min(a, b), min(c, d), min(e, f), max(a, b), max(c, d), max(e, f)]
    corners = [a, b, c, d, e, f]
    candidates = {"slicer": interleaved, "corners": corners}
    if layout is not None:
        candidates = {layout: candidates[layout]}
    readings = {name: box for name, box in candidates.items() if fits(box)}
    if not readings:
        forms = {"slicer": "[i0, i1, j0, j1, k0, k1] (3D Slicer)", "corners": "[i0, j0, k0, i1, j1, k1]"}
        raise PromptError(
            f"roi {roi!r} lies outside the volume of shape {(width, height, depth)} read as "
            + " or as ".join(forms[name] for name in candidates)
        )
    if len(readings) == 2 and readings["slicer"] != readings["corners"]:
        raise PromptError(
            f"roi {roi!r} fits the volume both as [i0, i1, j0, j1, k0, k1] (i {interleaved[0]:g}..{interleaved[3]:g}, "
            f"j {interleaved[1]:g}..{interleaved[4]:g}, k {interleaved[2]:g}..{interleaved[5]:g}) and as "
            f"[i0, j0, k0, i1, j1, k1] (i {a:g}..{d:g}, j {b:g}..{e:g}, k {c:g}..{f:g}); send 'box3d' "
            "[x0, y0, z0, x1, y1, z1], or 'roi_layout' ('slicer' or 'corners'), to say which"
        )
    x0, y0, z0, x1, y1, z1 = next(iter(readings.values()))
    lower = [int(math.floor(v + 0.5)) for v in (x0, y0, z0)]
    upper = [min(int(math.floor(v + 0.5)) + 1, s) for v, s in zip((x1, y1, z1), (width, height, depth))]
    return [float(v) for v in (*lower, *upper)]


def _points(value, name: str, dims: int) -> list[list[float]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PromptError(f"{name} must be a list of [i, j(, k)] points, got {value!r}")
    points = []
    for point in value:
        coords = _numbers(point, f"{name} point")
        if len(coords) < 2 or len(coords) > 3 or (dims == 3 and len(coords) != 3):
            raise PromptError(f"{name} point {point!r} must have {'3 values [i, j, k]' if dims == 3 else '2 or 3 values'}")
        points.append(coords)
    return points


def _slice_from(request: Mapping, depth: int | None, roi_k, clicks: list[list[float]]) -> int | None:
    if depth is None:
        return None
    if request.get("slice") is not None:
        try:
            index = int(request["slice"])
        except (TypeError, ValueError):
            raise PromptError(f"slice must be an integer, got {request['slice']!r}") from None
    elif roi_k is not None:
        index = int(round((roi_k[0] + roi_k[1]) / 2))
    elif clicks:
        index = int(round(clicks[-1][2]))
    elif depth == 1:
        index = 0
    else:
        raise PromptError(f"this volume has {depth} slices: say which with 'slice', a 6-value roi, or clicks [i, j, k]")
    if not 0 <= index < depth:
        raise PromptError(f"slice {index} is outside the volume, which has slices 0..{depth - 1}")
    return index


def _clip(box: list[float], width: int, height: int, source: str) -> np.ndarray:
    x0, y0, x1, y1 = box
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise PromptError(
            f"the {source} box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the image ({width} x {height}, i x j)"
        )
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)], dtype=np.float32)
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise PromptError(f"the {source} box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] has zero area: it must span at least one pixel")
    return clipped


def resolve_box_prompt(request: Mapping, spatial_shape: Sequence[int]) -> BoxPrompt:
    """The box and slice a request asks for, on an image of ``spatial_shape`` (``(I, J)`` or ``(I, J, K)``).

    The box comes from, in order of precedence:

    - ``box``: ``[x0, y0, x1, y1]`` pixel edges (``x1`` is one past the last column), as the rest of
      :mod:`imedsam` uses;
    - ``roi``: see :func:`normalize_roi`; on a volume a 6-value roi may also be corners
      ``[i0, j0, k0, i1, j1, k1]``, told apart by :func:`~imedsam.inference.roi_to_box3d` (``roi_layout`` settles
      a roi that fits both ways);
    - ``foreground``: at least two clicks ``[i, j(, k)]`` on the slice, taken as opposite corners (OHIF's
      point prompt sends no box).

    For a volume the slice comes from ``slice``, else the middle of a 6-value roi's k range, else the last
    click's k; a one-slice volume needs none. A box partly outside the image is clipped to it; one wholly
    outside, or of zero area, is a :class:`PromptError`, as is a request with no usable prompt.
    """
    if len(spatial_shape) not in (2, 3):
        raise PromptError(f"expected a 2D image or a 3D volume, got spatial shape {tuple(spatial_shape)}")
    width, height = int(spatial_shape[0]), int(spatial_shape[1])
    depth = int(spatial_shape[2]) if len(spatial_shape) == 3 else None
    dims = len(spatial_shape)

    roi_k = None
    source = None
    if request.get("box") is not None:
        values = _numbers(request["box"], "box")
        if len(values) != 4:
            raise PromptError(f"box must be [x0, y0, x1, y1], got {len(values)} values")
        x0, y0, x1, y1 = values
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] has zero area or is inverted: x0 < x1 and y0 < y1 are required")
        box, source = [x0, y0, x1, y1], "box"
    elif request.get("roi") is not None and len(request["roi"]) == 6 and depth is not None:
        # a volume's 6-value roi comes in two layouts, told apart (or refused as ambiguous) by roi_to_box3d
        x0, y0, z0, x1, y1, z1 = roi_to_box3d(request["roi"], spatial_shape, request.get("roi_layout"))
        box, source, roi_k = [x0, y0, x1, y1], "roi", (z0, z1 - 1)
    elif request.get("roi") is not None and len(request["roi"]) > 0:
        (i0, i1), (j0, j1), roi_k = normalize_roi(request["roi"])
        box, source = [i0, j0, i1 + 1, j1 + 1], "roi"

    clicks = _points(request.get("foreground"), "foreground", dims)
    slice_index = _slice_from(request, depth, roi_k, clicks)
    if source is None:
        on_slice = [p for p in clicks if depth is None or len(p) < 3 or int(round(p[2])) == slice_index]
        if len(on_slice) < 2:
            raise PromptError(
                "no box prompt: send 'box' [x0, y0, x1, y1], a 'roi', or two foreground clicks on opposite corners "
                f"of the object (got {len(on_slice)} click(s) on this slice)"
            )
        ii = [p[0] for p in on_slice]
        jj = [p[1] for p in on_slice]
        box, source = [min(ii), min(jj), max(ii) + 1, max(jj) + 1], "clicks"
    return BoxPrompt(_clip(box, width, height, source), slice_index, source)
