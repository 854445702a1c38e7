"""A whole 3D mask from one prompt: the 2D model run slice by slice, each slice encoded once per volume.

:class:`VolumePredictor` is a session in the style of nnInteractive's: :meth:`~VolumePredictor.set_volume`,
then :meth:`~VolumePredictor.predict` with one prompt per object, any number of times. Encodings of slices live
in the :class:`~imedsam.inference.Predictor`'s cache, keyed by the slice's content and the model's weights, so
objects, prompts and requests on the same volume share them, and only slices the propagation reaches are
encoded.

The propagation rule (``docs/volumes.md`` has the measurements behind it):

1. The seed slice is decoded with the prompt's box. A 3D box's x/y extent is the union of the object's slices,
   loose on most of them, so its seed is chosen: its middle slice and those at ``seed_candidates`` (1/4, 3/8,
   5/8, 3/4) of its z-range are decoded with that extent, and the slice whose mask fills it best (the IoU of
   the mask's box with the extent, times the mask's mean probability) seeds the walk and anchors the
   clean-up (5). The encoder runs on those slices once either way: the walk covers the whole z-range.
1b. A click prompts its slice through the prompt encoder. The model marks the part of the object around the
   click, so the seed is grown in its slice (:func:`grow_click_mask`): the slice is decoded again with the box of
   its mask, widened by ``margin`` on every side, while that adds area (more than ``click_converged`` of it, at
   most ``click_rounds`` times) and keeps every foreground click inside the mask and every background click
   outside it. The walk goes on from the last box.
2. A 3D box then prompts every other slice of its z-range with its x/y extent too (``box3d_follows_masks``
   False, the default): for this model the box itself is a better prompt than a box derived from the
   neighbour's mask, on every shared volume set (``docs/results.md``), and the slices are independent.
3. Otherwise the object is followed to each neighbouring slice, in both directions. A slice is prompted
   with the box of its neighbour's mask, widened by ``margin`` of the box's side (at least ``min_margin``,
   3 voxels) on each side where that mask reached (within ``touch`` voxels) the edge of the box it answered, and
   by ``min_margin`` elsewhere. A box-prompted model keeps inside its box: the CVPR 2024 recipe's 3-pixel
   widening lets masks only shrink from slice to slice, and a wide margin on every side lets them drift onto
   what surrounds the object; widening only where the box cut the mask off follows an object that widens and
   takes the model at its word where it stopped short. A 3D box bounds every box by its x/y extent and the walk
   by its z-range, and an empty neighbour mask falls back to that extent, as in the recipe.
4. With no z-range (a 2D box or clicks), the walk decides where the object ends. It stops before a slice
   whose mask (a) has fewer than ``min_area`` voxels, (b) lies less than ``min_overlap`` on its neighbour's
   mask, (c) grows more than ``max_growth`` times its neighbour's area (the box has slipped onto another
   structure), or (d) has a mean probability below ``min_confidence`` or a mean UGS uncertainty above
   ``max_uncertainty`` times the seed slice's (the model is unsure the object is still there). A background
   click covered by a slice's mask stops the walk before that slice; foreground clicks keep it going at least
   to their slices.
5. Clean-up in 3D: only the connected components of the object's mask (26-connectivity) that touch the seed
   slice's mask are kept (all of them when the seed slice's mask is empty, which only a 3D box's walk outlives).
6. Several objects: object ``n`` is label ``n + 1``; where objects overlap, the most probable wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..data.intensity import intensity_rule, intensity_window
from ..data.modalities import normalize_modality
from ..data.pictures import ImageReadError
from ..networks.imedsam import IMedSAM
from ..networks.prompts.prompts import Prompts
from .planes import check_finite
from .predictor import Predictor
from .slabs import SlabEncoder
from .volume_prompts import ObjectPrompt

__all__ = ["PropagationRule", "VolumePrediction", "VolumePredictor", "check_volume", "grow_click_mask"]


class PropagationRule(NamedTuple):
    """The propagation's parameters; the module docstring says what each does (``docs/volumes.md`` has the
    measurements behind the defaults)."""

    margin: float = 0.2
    min_margin: float = 3.0
    touch: float = 1.0
    min_area: int = 4
    min_overlap: float = 0.5
    max_growth: float = 2.0
    min_confidence: float = 0.7
    max_uncertainty: float = 4.0
    seed_candidates: tuple[float, ...] = (0.25, 0.375, 0.625, 0.75)
    box3d_follows_masks: bool = False
    click_rounds: int = 3
    click_converged: float = 0.1


class VolumePrediction(NamedTuple):
    """The result on the volume's grid, ``(I, J, K)`` each."""

    labels: np.ndarray  #: uint16; object ``n`` is label ``n + 1``, background 0
    probability: np.ndarray  #: float32; the winning object's probability (0 where no slice was decoded or the clean-up removed)
    uncertainty: np.ndarray  #: float32; the winning object's UGS uncertainty (MC-dropout logit variance)
    slices: list[tuple[int, int]]  #: per object, the ``[first, last + 1)`` slices its walk decoded
    encoder_calls: int  #: slices encoded by this call (the rest came from the cache)
    seconds: float
    seed_slices: list[int]  #: per object, the slice its walk started from


def grow_click_mask(
    decode_box: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    probability: np.ndarray,
    uncertainty: np.ndarray,
    points: np.ndarray,
    point_labels: np.ndarray,
    rule: PropagationRule = PropagationRule(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Grow a click's mask in its plane: the model marks the part of the object around a click, so the plane is
    decoded again with the box of that mask, widened by ``rule.margin`` of its side on every side (at least
    ``rule.min_margin``), while that adds more than ``rule.click_converged`` of its area, at most
    ``rule.click_rounds`` times, and only while the mask keeps every foreground click (label 1 of
    ``point_labels``) inside it and every background click (0) outside it.

    ``decode_box(box) -> (probability, uncertainty)`` decodes the plane for a box ``[x0, y0, x1, y1]``; the maps
    are ``H x W`` and ``points`` ``[K, 2]`` x, y pixel indices of the plane. Returns the kept maps and the box
    that gave them (None: the clicks' own mask was kept).
    """
    height, width = probability.shape
    box = None
    marked = [(int(x), int(y), int(label)) for (x, y), label in zip(np.asarray(points), np.asarray(point_labels)) if label >= 0]
    for _ in range(rule.click_rounds):
        mask = probability > 0.5
        if not mask.any():
            break
        wider = _next_box(mask, _mask_box(mask), rule, width, height)
        grown_probability, grown_uncertainty = decode_box(wider)
        grown = grown_probability > 0.5
        if not all(grown[y, x] == bool(label) for x, y, label in marked) or grown.sum() <= mask.sum():
            break  # the box lost a foreground click, covered a background one, or added nothing
        converged = grown.sum() <= (1 + rule.click_converged) * mask.sum()
        probability, uncertainty, box = grown_probability, grown_uncertainty, wider
        if converged:
            break
    return probability, uncertainty, box


def check_volume(volume) -> np.ndarray:
    """The ``(I, J, K)`` scalar volume of ``volume`` (a trailing channel of 1 is dropped), or a clear error."""
    array = np.asarray(volume)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ImageReadError(f"expected a 3D scalar volume (I, J, K), got shape {array.shape}")
    if 0 in array.shape:
        raise ImageReadError(f"the volume is empty: shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise ImageReadError(f"the volume must hold numbers, got dtype {array.dtype}")
    return array


def _next_box(mask: np.ndarray, prompt_box: np.ndarray, rule: PropagationRule, width: int, height: int) -> np.ndarray:
    """The box for the slice after one whose ``mask`` answered ``prompt_box``: the mask's box, widened by
    ``rule.margin`` of its side on each side where the mask reached the prompt's edge (the box cut the object
    off, so it may go on), by ``rule.min_margin`` elsewhere."""
    box = _mask_box(mask)
    side = box[2:] - box[:2]
    grow = np.maximum(side * rule.margin, rule.min_margin)
    cut_low = box[:2] - prompt_box[:2] <= rule.touch
    cut_high = prompt_box[2:] - box[2:] <= rule.touch
    lower = np.maximum(box[:2] - np.where(cut_low, grow, rule.min_margin), 0)
    upper = np.minimum(box[2:] + np.where(cut_high, grow, rule.min_margin), (width, height))
    return np.concatenate([lower, upper]).astype(np.float32)


def _box_iou(box: np.ndarray, other: np.ndarray) -> float:
    overlap = np.clip(np.minimum(box[2:], other[2:]) - np.maximum(box[:2], other[:2]), 0, None).prod()
    return float(overlap / ((box[2:] - box[:2]).prod() + (other[2:] - other[:2]).prod() - overlap))


def _mask_box(mask: np.ndarray) -> np.ndarray:
    rows, columns = np.nonzero(mask)
    return np.array([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], np.float32)


def _intersect(box: np.ndarray, limit: np.ndarray | None) -> np.ndarray:
    if limit is None:
        return box
    inside = np.concatenate([np.maximum(box[:2], limit[:2]), np.minimum(box[2:], limit[2:])])
    return inside if (inside[2:] - inside[:2] >= 1).all() else limit.copy()


class VolumePredictor:
    """Segment objects in a volume from one prompt each (see the module docstring for the rule).

    Args:
        model: an :class:`~imedsam.networks.IMedSAM`, or a :class:`~imedsam.inference.Predictor` to share with
            2D prompts (its encoding cache then serves both).
        cache_slices: slice encodings kept (4 MiB each for ``lite_medsam``); a slice evicted and reached again
            is encoded again. Ignored when ``model`` is a Predictor, except by a model with volumetric adapters
            (``model.slab_depth > 1``), whose slices are encoded a slab of neighbours at a time and kept in whole
            slabs (:class:`~imedsam.inference.slabs.SlabEncoder`).
        rule: the propagation's :class:`PropagationRule`.
        predictor_options: passed to :class:`~imedsam.inference.Predictor` (``decode_mode``, ``encoder_engine``,
            ``max_decode_side``).

    The intensity rule (:meth:`set_volume`): ``window=(low, high)`` if given; else CT (``modality="ct"``, or a
    volume that holds air) gets LiteMedSAM's abdomen window L40/W400 (-160..240 HU) and MR or anything else the
    0.5-99.5 percentiles of its non-zero voxels; the range is mapped to [0, 1] and each slice repeated to RGB.
    The modality is also the prompt of every slice (:meth:`Predictor.set_image`), which a model with a modality
    prompt uses.

    Example::

        >>> import numpy as np
        >>> from imedsam.networks import build_imedsam
        >>> from imedsam.inference import box3d_prompt
        >>> volume = np.zeros((40, 32, 6), np.float32); volume[10:30, 8:24, 1:5] = 1
        >>> session = VolumePredictor(build_imedsam("vit_tiny", image_size=64), encoder_engine="torch")
        >>> session.set_volume(volume)
        >>> result = session.predict([box3d_prompt([10, 8, 1, 30, 24, 5], volume.shape)])
        >>> result.labels.shape, result.slices
        ((40, 32, 6), [(1, 5)])
    """

    def __init__(
        self,
        model: IMedSAM | Predictor,
        cache_slices: int = 384,
        rule: PropagationRule = PropagationRule(),
        **predictor_options,
    ) -> None:
        if isinstance(model, Predictor):
            self.predictor = model
        else:
            self.predictor = Predictor(model, cache_size=cache_slices, **predictor_options)
        self.rule = rule
        self.cache_slices = cache_slices
        self._slabs: SlabEncoder | None = None
        self._volume: np.ndarray | None = None
        self.window: tuple[float, float] | None = None
        self.modality: str | None = None
        self.affine: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        if self._volume is None:
            raise RuntimeError("call set_volume() first")
        return tuple(int(v) for v in self._volume.shape)

    def set_volume(self, volume, affine=None, window: Sequence[float] | None = None, modality: str | None = None) -> None:
        """Take ``volume`` ``(I, J, K)`` (and its ``affine``, kept for the caller) and fix its intensity range.

        ``modality``: the volume's imaging modality, a name of :data:`imedsam.data.MODALITIES` or a DICOM code
        (``"CT"``, ``"MR"``, ``"PT"``, ...); None: not known. It picks the intensity rule when ``window`` is None
        (:func:`~imedsam.data.intensity.intensity_rule`: CT's window for ``ct``, the percentiles for any other, a
        guess from the values for None) and is every slice's modality prompt. An unknown name is a ``ValueError``.

        Nothing is encoded here: slices are encoded when the propagation first reaches them.
        """
        self._volume = None
        name = normalize_modality(modality)
        array = check_volume(volume)
        self.window = intensity_window(array, window, intensity_rule(name))
        self.modality = name
        self._volume = array
        self.affine = None if affine is None else np.asarray(affine)
        self._slabs = None
        if self.predictor.model.slab_depth > 1:  # an encoder with volumetric adapters sees each slice with its slab
            self._slabs = SlabEncoder(self.predictor, self.plane, array.shape[2], self.cache_slices)

    def plane(self, k: int) -> np.ndarray:
        """Slice ``k`` as the model sees it: ``J x I x 3`` float32 in [0, 1]."""
        check_finite(self._volume[:, :, k], k, ", on a slice the prompt reaches")
        raw = self._volume[:, :, k].T
        low, high = self.window
        plane = np.clip((raw.astype(np.float32) - low) / (high - low), 0.0, 1.0)
        return np.repeat(plane[..., None], 3, axis=-1)

    def decode_slice(self, k: int, box: np.ndarray | Prompts) -> tuple[np.ndarray, np.ndarray]:
        """Probability and uncertainty (``J x I``) of slice ``k`` for ``box`` ``[x0, y0, x1, y1]``, or for the
        :class:`~imedsam.networks.Prompts` of one prompt on it (a click prompt's, :meth:`ObjectPrompt.slice_prompts`)."""
        if self._slabs is not None:
            encoding, cached = self._slabs.encoding(k)
            self.predictor.set_encoding(encoding, modality=self.modality, cached=cached)
        else:
            self.predictor.set_image(self.plane(k), modality=self.modality)
        prediction = self.predictor.predict(box)
        if isinstance(box, Prompts):  # one prompt: its own axis of one
            return prediction.probability[0], prediction.uncertainty[0]
        return prediction.probability, prediction.uncertainty

    # -- propagation -------------------------------------------------------------------------------------
    def _continues(self, mask, probability, uncertainty, neighbour, seed_uncertainty) -> bool:
        rule = self.rule
        area = int(mask.sum())
        if area < rule.min_area:
            return False
        reach = ndimage.binary_dilation(neighbour, iterations=1)
        if (mask & reach).sum() < rule.min_overlap * area:
            return False
        if area > rule.max_growth * max(int(neighbour.sum()), 1):
            return False
        if probability[mask].mean() < rule.min_confidence:
            return False
        return uncertainty[mask].mean() <= rule.max_uncertainty * max(seed_uncertainty, 1e-6)

    def _walk(self, prompt: ObjectPrompt, direction: int, seed_mask, seed_uncertainty, keep, progress, tried):
        depth, (width, height) = self.shape[2], self.shape[:2]
        low, high = prompt.z_range or (0, depth)
        fg_reach = [k for k in prompt.must_reach if (k - prompt.seed_slice) * direction > 0]
        reach = max(fg_reach, key=lambda k: abs(k - prompt.seed_slice)) if fg_reach else None
        stops = {k for _, _, k in prompt.background}
        # a click prompt has no box: the seed mask's own box is the first one the walk grows from
        neighbour, neighbour_box = seed_mask, prompt.box if prompt.box is not None else _mask_box(seed_mask)
        k = prompt.seed_slice + direction
        while low <= k < high:
            if prompt.z_range is not None and not self.rule.box3d_follows_masks:
                box = prompt.xy_limit
            elif neighbour.any():
                box = _intersect(_next_box(neighbour, neighbour_box, self.rule, width, height), prompt.xy_limit)
            elif prompt.xy_limit is not None:
                box = prompt.xy_limit
            else:
                break
            # a seed candidate, decoded with this box already
            if k in tried and prompt.points is None and np.array_equal(box, prompt.box):
                probability, uncertainty = tried[k]
            else:
                probability, uncertainty = self.decode_slice(k, box)
                if progress is not None:
                    progress(1)
            mask = probability > 0.5
            must = reach is not None and (reach - k) * direction >= 0
            if prompt.z_range is None and not must and not self._continues(mask, probability, uncertainty, neighbour, seed_uncertainty):
                break
            if k in stops and any(mask[j, i] for i, j, kk in prompt.background if kk == k):
                break
            keep[k] = (probability, uncertainty)
            neighbour, neighbour_box = mask, box
            k += direction

    def _seed(self, prompt: ObjectPrompt, progress) -> tuple[ObjectPrompt, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """The prompt with its seed slice, and every slice tried for it: ``{k: (probability, uncertainty)}``. A 3D
        box's middle slice and the slices at ``rule.seed_candidates`` of its z-range are decoded with its x/y
        extent; the one whose mask fills the extent best (the IoU of the mask's box with it, times the mask's
        mean probability) seeds."""
        if prompt.points is not None:
            return self._grow_click_seed(prompt, progress)
        candidates = {prompt.seed_slice}
        if prompt.z_range is not None:
            z0, z1 = prompt.z_range
            candidates |= {int(z0 + fraction * (z1 - 1 - z0) + 0.5) for fraction in self.rule.seed_candidates}
        best, tried = None, {}
        for k in [prompt.seed_slice, *sorted(candidates - {prompt.seed_slice})]:  # a tie keeps the middle
            probability, uncertainty = tried[k] = self.decode_slice(k, prompt.box)
            if progress is not None:
                progress(1)
            mask = probability > 0.5
            fill = _box_iou(_mask_box(mask), prompt.box) * float(probability[mask].mean()) if mask.any() else 0.0
            if best is None or fill > best[0]:
                best = (fill, k)
        return prompt._replace(seed_slice=best[1]), tried

    def _grow_click_seed(self, prompt: ObjectPrompt, progress) -> tuple[ObjectPrompt, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """A click prompt's seed: its slice decoded with the clicks, then grown in the slice (:func:`grow_click_mask`).
        The prompt comes back with the box that gave the kept mask (None: the clicks' own), which the walk goes on from."""
        k = prompt.seed_slice

        def decode(prompts):
            if progress is not None:
                progress(1)
            return self.decode_slice(k, prompts)

        probability, uncertainty = decode(prompt.slice_prompts())
        probability, uncertainty, box = grow_click_mask(decode, probability, uncertainty, prompt.points, prompt.point_labels, self.rule)
        return prompt._replace(box=box), {k: (probability, uncertainty)}

    def _segment_object(self, prompt: ObjectPrompt, progress) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
        prompt, tried = self._seed(prompt, progress)
        probability, uncertainty = tried[prompt.seed_slice]
        seed_mask = probability > 0.5
        kept = {prompt.seed_slice: (probability, uncertainty)}
        seed_uncertainty = float(uncertainty[seed_mask].mean()) if seed_mask.any() else 0.0
        if seed_mask.any() or prompt.xy_limit is not None:
            for direction in (1, -1):
                self._walk(prompt, direction, seed_mask, seed_uncertainty, kept, progress, tried)
        return prompt.seed_slice, kept

    @staticmethod
    def _clean(kept: dict, seed_slice: int) -> np.ndarray:
        """The object's mask over its slices ``[J, I, n]`` with only the components touching the seed slice's mask
        (all of them where that mask is empty: a 3D box's walk then has no anchor, and nothing it found is dropped)."""
        order = sorted(kept)
        mask = np.stack([kept[k][0] > 0.5 for k in order], axis=-1)
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        seed_labels = np.unique(components[..., order.index(seed_slice)])
        seed_labels = seed_labels[seed_labels > 0]
        if count <= 1 or seed_labels.size == 0:
            return mask
        return np.isin(components, seed_labels)

    def predict(self, prompts: Sequence[ObjectPrompt], progress: Callable[[int], None] | None = None) -> VolumePrediction:
        """Segment one object per prompt; ``progress(n)`` is called as ``n`` more slices are decoded."""
        if self._volume is None:
            raise RuntimeError("call set_volume() before predict()")
        if not prompts:
            raise ValueError("no prompt: give one ObjectPrompt per object")
        start, calls = time.perf_counter(), self.predictor.encoder_calls
        shape = self.shape
        labels = np.zeros(shape, np.uint16)
        best = np.zeros(shape, np.float32)
        best_uncertainty = np.zeros(shape, np.float32)
        ranges, seeds = [], []
        for index, prompt in enumerate(prompts):
            seed_slice, kept = self._segment_object(prompt, progress)
            cleaned = self._clean(kept, seed_slice)
            for position, k in enumerate(sorted(kept)):
                # voxels the clean-up removed count as background for this object; the rest keep their probability
                removed = (kept[k][0] > 0.5) & ~cleaned[..., position]
                probability = np.where(removed, 0.0, kept[k][0]).T
                wins = probability > best[:, :, k]
                labels[:, :, k][wins] = np.where(probability[wins] > 0.5, index + 1, 0)
                best[:, :, k][wins] = probability[wins]
                best_uncertainty[:, :, k][wins] = kept[k][1].T[wins]
            ranges.append((min(kept), max(kept) + 1))
            seeds.append(seed_slice)
        seconds = time.perf_counter() - start
        return VolumePrediction(labels, best, best_uncertainty, ranges, self.predictor.encoder_calls - calls, seconds, seeds)
