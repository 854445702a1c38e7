"""Prompts on a volume: a 3D box, a 2D box on one slice, or clicks, each turned into one :class:`ObjectPrompt`.

Coordinates are voxel indices ``(i, j, k)`` in MONAI's array order, as 3D Slicer (IJK) and OHIF
(``worldToIndex``) send them. On a slice, ``x = i`` and ``y = j`` (see :mod:`imedsam.inference.planes`). Box
upper bounds are exclusive, as everywhere in :mod:`imedsam`: ``x1`` is the last column + 1, ``z1`` the last
slice + 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..networks.prompts.prompts import Prompts
from .prompts import ROI_LAYOUTS, PromptError, roi_to_box3d

__all__ = ["CLICK_MODES", "ObjectPrompt", "box3d_prompt", "slice_box_prompt", "click_prompt", "resolve_volume_prompts"]

#: what clicks on a volume mean: ``"points"`` clicks through the prompt encoder, ``"corners"`` two or more clicks
#: on one slice as opposite corners of the object's box, ``"auto"`` one foreground click on that slice a point
#: and two or more corners (what OHIF's users of this app are told to click)
CLICK_MODES = ("auto", "points", "corners")


class ObjectPrompt(NamedTuple):
    """One object to segment in a volume, as the propagation reads it.

    ``box`` prompts the ``seed_slice``, with ``points`` (``[K, 2]`` x = i, y = j on that slice, labels ``[K]``: 1
    foreground, 0 background) through the prompt encoder beside it, or alone (``box`` None: a click prompt);
    from there the object is followed slice by slice in both directions, by boxes from the masks.
    ``z_range`` (``[z0, z1)``) bounds that walk when the prompt says where the object ends (a 3D box), else the
    propagation decides; ``xy_limit`` (``[x0, y0, x1, y1]``) is a box no propagated box may leave (a 3D box's
    extent). ``background`` clicks ``(i, j, k)`` mark voxels that are not the object: the walk stops before a
    slice whose mask covers one.
    """

    box: np.ndarray | None
    seed_slice: int
    z_range: tuple[int, int] | None = None
    xy_limit: np.ndarray | None = None
    background: tuple[tuple[int, int, int], ...] = ()
    source: str = "box"
    must_reach: tuple[int, ...] = ()  #: slices the walk reaches whatever its stop tests say (foreground clicks)
    points: np.ndarray | None = None  #: ``[K, 2]`` clicks on the seed slice for the prompt encoder
    point_labels: np.ndarray | None = None  #: ``[K]`` 1 foreground, 0 background

    def slice_prompts(self) -> Prompts:
        """The seed slice's prompt as the network takes it: the box, the clicks, or both, for one image."""
        boxes = None if self.box is None else self.box[None, None]
        if self.points is None:
            return Prompts(boxes=boxes)
        return Prompts(boxes=boxes, points=self.points[None, None], point_labels=self.point_labels[None, None])


def _numbers(values, name: str, count: int) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise PromptError(f"{name} must be a list of {count} numbers, got {values!r}")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be a list of {count} numbers, got {values!r}") from None
    if len(numbers) != count:
        raise PromptError(f"{name} must have {count} values, got {len(numbers)}")
    if not all(math.isfinite(v) for v in numbers):
        raise PromptError(f"{name} contains NaN or infinite values: {values!r}")
    return numbers


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise PromptError(f"a volume prompt needs a 3D volume (I, J, K), got spatial shape {tuple(shape)}")
    return tuple(int(v) for v in shape)


def _inside(box: Sequence[float], width: int, height: int, what: str) -> np.ndarray:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise PromptError(f"{what} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] has zero area or is inverted: x0 < x1 and y0 < y1 are required")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise PromptError(
            f"{what} [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the volume's slices ({width} x {height}, i x j): "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} are required"
        )
    return np.array(box, dtype=np.float32)


def box3d_prompt(box3d: Sequence[float], shape: Sequence[int]) -> ObjectPrompt:
    """The object inside ``box3d = [x0, y0, z0, x1, y1, z1]`` (the CVPR 2024 challenge's 3D box).

    The middle slice ``(z0 + z1 - 1) // 2`` is prompted with the box's x/y extent; the walk covers ``[z0, z1)``
    and never leaves that extent.
    """
    width, height, depth = _check_shape(shape)
    x0, y0, z0, x1, y1, z1 = _numbers(box3d, "box3d [x0, y0, z0, x1, y1, z1]", 6)
    box = _inside([x0, y0, x1, y1], width, height, "the 3D box's x/y extent")
    if z1 <= z0 or z0 < 0 or z1 > depth or z0 != int(z0) or z1 != int(z1):
        raise PromptError(f"the 3D box's z-range [{z0:g}, {z1:g}) must be whole slices with 0 <= z0 < z1 <= {depth}")
    z0, z1 = int(z0), int(z1)
    return ObjectPrompt(box, (z0 + z1 - 1) // 2, (z0, z1), box.copy(), (), "box3d")


def slice_box_prompt(box: Sequence[float], slice_index: int, shape: Sequence[int]) -> ObjectPrompt:
    """The object in ``box = [x0, y0, x1, y1]`` on slice ``slice_index``: what a person draws in a viewer. The
    propagation decides where the object ends."""
    width, height, depth = _check_shape(shape)
    checked = _inside(_numbers(box, "box [x0, y0, x1, y1]", 4), width, height, "the box")
    if isinstance(slice_index, bool) or int(slice_index) != slice_index or not 0 <= int(slice_index) < depth:
        raise PromptError(f"slice {slice_index!r} is outside the volume, which has slices 0..{depth - 1}")
    return ObjectPrompt(checked, int(slice_index), None, None, (), "box")


def _clicks(values, name: str, shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise PromptError(f"{name} must be a list of [i, j, k] clicks, got {values!r}")
    clicks = []
    for value in values:
        i, j, k = (int(round(v)) for v in _numbers(value, f"{name} click", 3))
        if not all(0 <= v < s for v, s in zip((i, j, k), shape)):
            raise PromptError(f"{name} click [{i}, {j}, {k}] is outside the volume of shape {shape}")
        clicks.append((i, j, k))
    return clicks


def click_prompt(foreground, background, shape: Sequence[int], mode: str = "auto") -> ObjectPrompt:
    """The object marked by foreground clicks ``[[i, j, k], ...]`` (and ``background`` ones), as OHIF sends them.

    The seed is the slice with the most foreground clicks (the last clicked among equals). ``mode``
    (:data:`CLICK_MODES`) says what its clicks are:

    - ``"points"``: prompts of their own: the seed slice's foreground and background clicks go through the
      model's prompt encoder (3DSAM-adapter's and SAM's click prompt; the model must have been trained with
      clicks, ``click_prob`` in the bundle, as the ``all_modalities_clicks`` weight set was);
    - ``"corners"``: two or more foreground clicks are opposite corners of the object's box on the seed slice;
    - ``"auto"`` (default): one foreground click on the seed slice is a point, two or more are corners.

    Either way the walk finds the object's end (clicks have no z-range); a foreground click on any other slice
    keeps the walk going at least to that slice, and background clicks stop it before a slice whose mask covers
    one.
    """
    if mode not in CLICK_MODES:
        raise PromptError(f"clicks must be one of {', '.join(CLICK_MODES)}, got {mode!r}")
    shape = _check_shape(shape)
    fg = _clicks(foreground, "foreground", shape)
    bg = _clicks(background, "background", shape)
    if not fg:
        raise PromptError("no foreground clicks: click the object (or two opposite corners of it) on one slice")
    counts: dict[int, int] = {}
    for _, _, k in fg:
        counts[k] = counts.get(k, 0) + 1
    seed = max(reversed([k for _, _, k in fg]), key=lambda k: counts[k])
    on_seed = [c for c in fg if c[2] == seed]
    z_reached = tuple(sorted({k for _, _, k in fg}))
    if mode == "points" or (mode == "auto" and len(on_seed) == 1):
        marked = [(c, 1) for c in on_seed] + [(c, 0) for c in bg if c[2] == seed]
        points = np.array([[i, j] for (i, j, _), _ in marked], np.float32)
        labels = np.array([label for _, label in marked], np.int64)
        return ObjectPrompt(None, seed, None, None, tuple(bg), "points", z_reached, points, labels)
    if len(on_seed) < 2:
        raise PromptError(
            f"one foreground click on slice {seed} with clicks 'corners': click two opposite corners of the object "
            "on one slice, or send clicks 'points' (or 'auto') to prompt with the click itself"
        )
    ii, jj = [c[0] for c in on_seed], [c[1] for c in on_seed]
    box = np.array([min(ii), min(jj), max(ii) + 1, max(jj) + 1], np.float32)
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        raise PromptError(f"the clicks on slice {seed} span less than 2 voxels along i or j: click opposite corners")
    return ObjectPrompt(box, seed, None, None, tuple(bg), "clicks", z_reached)


def _box3d_list(value) -> list:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and isinstance(value[0], (list, tuple, np.ndarray)):
        return list(value)
    return [value]


def resolve_volume_prompts(request, shape: Sequence[int]) -> list[ObjectPrompt]:
    """One :class:`ObjectPrompt` per object a request names, on a volume of ``shape`` ``(I, J, K)``.

    In order of precedence:

    - ``box3d``: ``[x0, y0, z0, x1, y1, z1]`` or a list of them (one object each, label ``n + 1`` for the
      ``n``-th), upper bounds exclusive;
    - ``roi``: 6 values, 3D Slicer's ``[i0, i1, j0, j1, k0, k1]`` or corners ``[i0, j0, k0, i1, j1, k1]``
      (inclusive; :func:`roi_to_box3d` says how they are told apart, and ``roi_layout`` settles it), or 4 values
      ``[i0, j0, i1, j1]`` on ``slice``;
    - ``box`` ``[x0, y0, x1, y1]`` on ``slice``;
    - ``foreground`` clicks ``[[i, j, k], ...]``, with optional ``background`` clicks and ``clicks``, what they
      mean (:func:`click_prompt`: ``auto``, ``points`` or ``corners``).
    """
    shape = _check_shape(shape)
    if request.get("box3d") is not None:
        return [box3d_prompt(box, shape) for box in _box3d_list(request["box3d"])]
    roi = request.get("roi")
    if roi is not None and len(roi) == 6:
        return [box3d_prompt(roi_to_box3d(roi, shape, request.get("roi_layout")), shape)]
    if roi is not None and len(roi) == 4:
        i0, j0, i1, j1 = _numbers(roi, "roi", 4)
        box = [min(i0, i1), min(j0, j1), max(i0, i1) + 1, max(j0, j1) + 1]
        return [slice_box_prompt(box, _slice_field(request, shape), shape)]
    if roi is not None and len(roi):
        raise PromptError(f"roi must have 6 values (a 3D box) or 4 values [i0, j0, i1, j1] with 'slice', got {len(roi)}")
    if request.get("box") is not None:
        return [slice_box_prompt(request["box"], _slice_field(request, shape), shape)]
    if request.get("foreground"):
        return [click_prompt(request.get("foreground"), request.get("background"), shape, request.get("clicks") or "auto")]
    raise PromptError(
        "no prompt: send 'box3d' [x0, y0, z0, x1, y1, z1], a 6-value 'roi', 'box' [x0, y0, x1, y1] with 'slice', "
        "or 'foreground' clicks [i, j, k]: one on the object, or two on opposite corners of it"
    )


def _slice_field(request, shape: tuple[int, int, int]) -> int:
    value = request.get("slice")
    if value is None:
        raise PromptError(f"a 2D box on a volume needs 'slice', the slice (0..{shape[2] - 1}) it is drawn on")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PromptError(f"slice must be an integer, got {value!r}") from None
