"""Volume evaluation: 3D DSC and NSD per object under three prompt protocols, with LiteMedSAM's CVPR 2024 recipe
run on the same volumes and prompts.

Protocols, each from the ground truth of one object:

- ``box3d``: the object's 3D bounding box ``[x0, y0, z0, x1, y1, z1]`` (the CVPR 2024 challenge's prompt);
- ``slice_box``: the tight 2D box on the object's middle slice (the middle of its z-range, or the nearest
  slice that holds the object) and nothing else: the propagation finds where the object ends;
- ``every_slice``: the tight box on every slice that holds the object, no propagation: the 2D upper bound;
- ``click``: one foreground click on that middle slice, at the object's centre there
  (:func:`~imedsam.data.click_from_mask`), through the prompt encoder: 3DSAM-adapter's single-click prompt.

The reference runs the box protocols (its recipe takes no click): the recipe for ``box3d``, the recipe's walk until a mask is empty for
``slice_box``, and LiteMedSAM on every slice for ``every_slice``. NSD is MONAI's
:func:`~monai.metrics.compute_surface_dice` at ``nsd_tolerance_mm`` (2 mm by default, the challenge's).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..data.boxes import box_from_mask
from ..data.clicks import click_from_mask
from ..data.volume_datalist import read_volume_datalist
from ..inference.planes import load_image_array
from ..inference.volume import VolumePredictor
from ..inference.volume_prompts import ObjectPrompt, box3d_prompt, click_prompt, slice_box_prompt
from ..networks.imedsam import IMedSAM
from .lite_medsam_3d import LiteMedSAMVolumeRecipe

__all__ = ["PROTOCOLS", "VolumeEvaluation", "box3d_of", "middle_slice_box", "surface_dice", "end_gaps", "read_volume_datalist"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("box3d", "slice_box", "every_slice", "click")
#: the protocols LiteMedSAM's recipe runs (it is prompted by boxes)
REFERENCE_PROTOCOLS = ("box3d", "slice_box", "every_slice")


def box3d_of(mask: np.ndarray) -> list[float]:
    """``[x0, y0, z0, x1, y1, z1]`` (exclusive upper bounds) of a 3D mask ``(I, J, K)``."""
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("mask is empty: a 3D box needs at least one foreground voxel")
    low, high = where.min(axis=0), where.max(axis=0) + 1
    return [float(v) for v in (*low, *high)]


def middle_slice_box(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The tight box ``[x0, y0, x1, y1]`` on the object's middle slice and that slice: the middle of the object's
    z-range, or the nearest slice that holds the object."""
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    middle = (int(slices[0]) + int(slices[-1])) // 2
    k = int(slices[np.argmin(np.abs(slices - middle))])
    return box_from_mask(mask[:, :, k].T), k


def surface_dice(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice of two 3D masks at ``tolerance_mm`` (MONAI's ``compute_surface_dice``)."""
    from monai.metrics import compute_surface_dice

    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0

    def one_hot(mask):
        tensor = torch.from_numpy(np.ascontiguousarray(mask)).bool()
        return torch.stack([~tensor, tensor])[None].float()

    value = compute_surface_dice(
        one_hot(pred), one_hot(target), class_thresholds=[tolerance_mm], include_background=False,
        spacing=[float(s) for s in spacing],
    )
    return float(value.item())


def end_gaps(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Slices of the object's z-range left empty by ``pred`` below its first and above its last predicted slice."""
    truth = np.flatnonzero(target.any(axis=(0, 1)))
    found = np.flatnonzero((pred & target).any(axis=(0, 1)))
    if found.size == 0:
        return int(truth.size), 0
    return int(max(0, found[0] - truth[0])), int(max(0, truth[-1] - found[-1]))


def volume_objects(label: np.ndarray, spec, min_voxels: int) -> list[tuple[str, np.ndarray]]:
    """``(name, mask)`` per object of a label volume: ``spec`` maps names to label values, or is ``"each"`` (or
    None) for one object per value; objects under ``min_voxels`` or on one slice are left out."""
    if spec in (None, "each"):
        spec = {str(int(v)): [int(v)] for v in np.unique(label) if v != 0}
    objects = []
    for name, values in spec.items():
        mask = np.isin(label, values)
        if mask.sum() >= min_voxels and mask.any(axis=(0, 1)).sum() >= 2:
            objects.append((name, mask))
    return objects


class VolumeEvaluation:
    """Score a model on volumes: per object and protocol, 3D DSC, NSD, the end gaps, the time and the encoder
    calls, beside LiteMedSAM's recipe on the same prompts.

    Args:
        network: the :class:`~imedsam.networks.IMedSAM` to evaluate.
        datalist: a volume datalist JSON (:func:`read_volume_datalist`), or its cases.
        output_dir: where ``volumes.csv`` (one row per case, object, protocol and method) and ``summary.json``
            (means per protocol and method) go.
        protocols: any of :data:`PROTOCOLS`.
        reference: run LiteMedSAM's recipe too.
        min_voxels: objects smaller than this (or on a single slice) are left out.
        predictor_options: passed to :class:`~imedsam.inference.VolumePredictor`.
    """

    def __init__(
        self,
        network: IMedSAM,
        datalist: str | list[dict],
        output_dir: str,
        protocols: Sequence[str] = PROTOCOLS,
        reference: bool = True,
        nsd_tolerance_mm: float = 2.0,
        min_voxels: int = 200,
        data_root: str | None = None,
        predictor_options: dict | None = None,
    ) -> None:
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; choose from {PROTOCOLS}")
        self.cases = read_volume_datalist(datalist, data_root) if isinstance(datalist, str) else list(datalist)
        self.session = VolumePredictor(network.eval(), **(predictor_options or {}))
        self.recipe = LiteMedSAMVolumeRecipe(cache_encodings=True) if reference else None
        self.output_dir, self.protocols = output_dir, tuple(protocols)
        self.nsd_tolerance_mm, self.min_voxels = nsd_tolerance_mm, min_voxels

    def _predict(self, method: str, protocol: str, mask: np.ndarray) -> np.ndarray:
        shape = mask.shape
        if protocol == "every_slice":
            pred = np.zeros(shape, bool)
            for k in np.flatnonzero(mask.any(axis=(0, 1))):
                box = box_from_mask(mask[:, :, k].T)
                if method == "imedsam":
                    pred[:, :, k] = (self.session.decode_slice(int(k), box)[0] > 0.5).T
                else:
                    pred[:, :, k] = self.recipe.slice_mask(int(k), box).T
            return pred
        if protocol == "box3d":
            prompt: ObjectPrompt = box3d_prompt(box3d_of(mask), shape)
        elif protocol == "click":
            _, k = middle_slice_box(mask)
            i, j = click_from_mask(mask[:, :, k].T)
            prompt = click_prompt([[i, j, k]], None, shape, mode="points")
        else:
            box, k = middle_slice_box(mask)
            prompt = slice_box_prompt(box, k, shape)
        if method == "imedsam":
            return self.session.predict([prompt]).labels > 0
        return self.recipe.predict([prompt], open_ended=protocol == "slice_box").labels > 0

    def _case_rows(self, case: dict) -> list[dict]:
        image = load_image_array(case["image"])
        label = np.asarray(load_image_array(case["label"]))
        if label.ndim == 4 and label.shape[-1] == 1:
            label = label[..., 0]
        spacing = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
        volume = np.asarray(image)
        if volume.shape[:3] != label.shape:
            raise ValueError(f"{case['image']}: image {volume.shape} and label {label.shape} differ in shape")
        modality = case.get("modality")
        self.session.set_volume(volume, modality=modality)
        if self.recipe is not None:
            self.recipe.set_volume(volume, modality=modality)
        methods = ("imedsam", "lite_medsam") if self.recipe is not None else ("imedsam",)
        rows = []
        for name, mask in volume_objects(label, case.get("objects"), self.min_voxels):
            for protocol in self.protocols:
                for method in methods if protocol in REFERENCE_PROTOCOLS else ("imedsam",):
                    start = time.perf_counter()
                    pred = self._predict(method, protocol, mask)
                    seconds = time.perf_counter() - start
                    inter = float((pred & mask).sum())
                    low_gap, high_gap = end_gaps(pred, mask)
                    rows.append({
                        "set": case.get("set", ""), "case": case.get("case", os.path.basename(case["image"])), "object": name,
                        "protocol": protocol,
                        "method": method, "dsc": 2 * inter / float(pred.sum() + mask.sum()),
                        "nsd": surface_dice(pred, mask, spacing, self.nsd_tolerance_mm),
                        "gap_low": low_gap, "gap_high": high_gap, "seconds": round(seconds, 3),
                        "object_slices": int(mask.any(axis=(0, 1)).sum()),
                    })
                    logger.info("%s %s %s %s: DSC %.4f NSD %.4f gaps %d/%d %.1f s", rows[-1]["case"], name, protocol,
                                method, rows[-1]["dsc"], rows[-1]["nsd"], low_gap, high_gap, seconds)
        return rows

    def run(self) -> dict:
        """Evaluate every case; write ``volumes.csv`` and ``summary.json``; return the summary."""
        os.makedirs(self.output_dir, exist_ok=True)
        rows = []
        for case in self.cases:
            rows.extend(self._case_rows(case))
            self._write(rows)
        return self._write(rows)

    def _means(self, rows: list[dict]) -> dict:
        means = {}
        for protocol in self.protocols:
            for method in ("imedsam", "lite_medsam"):
                chosen = [r for r in rows if r["protocol"] == protocol and r["method"] == method]
                if chosen:
                    means[f"{protocol}/{method}"] = {
                        key: round(float(np.mean([r[key] for r in chosen])), 4)
                        for key in ("dsc", "nsd", "gap_low", "gap_high", "seconds")
                    }
        return means

    def _write(self, rows: list[dict]) -> dict:
        if rows:
            with open(os.path.join(self.output_dir, "volumes.csv"), "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        summary: dict = {"nsd_tolerance_mm": self.nsd_tolerance_mm, "objects": len({(r["case"], r["object"]) for r in rows})}
        summary["means"] = self._means(rows)
        sets = sorted({r["set"] for r in rows if r["set"]})
        if sets:
            summary["by_set"] = {name: self._means([r for r in rows if r["set"] == name]) for name in sets}
        with open(os.path.join(self.output_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=1)
        return summary
