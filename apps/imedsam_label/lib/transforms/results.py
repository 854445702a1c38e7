"""Post transforms of the infer task: the inferer's maps become the label on the image's grid and the result JSON."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image

from imedsam.inference import place_plane
from imedsam.metrics import ugs_score

logger = logging.getLogger(__name__)


def wants_uncertainty(data: Mapping[str, Any]) -> bool:
    """Whether the request asked for the uncertainty (``true``, ``1`` or ``yes``, as JSON or as a form string)."""
    return str(data.get("uncertainty", False)).lower() in ("1", "true", "yes")


def uncertainty_summary(uncertainty: np.ndarray, mask: np.ndarray, box) -> dict[str, Any]:
    """The UGS map as a base64 8-bit PNG (``H x W``; value = pixel / 255 * ``max``) and its summary figures."""
    region = mask.astype(bool)
    peak = float(uncertainty.max())
    scaled = np.round(255.0 * uncertainty / peak) if peak > 0 else np.zeros_like(uncertainty)
    buffer = io.BytesIO()
    Image.fromarray(scaled.astype(np.uint8)).save(buffer, format="PNG")
    return {
        "map_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "max": peak,
        "mean_in_prediction": float(uncertainty[region].mean()) if region.any() else None,
        "score": ugs_score(uncertainty, mask, box),
    }


class _ResultTransform(MapTransform):
    """``keys``: the inferer's outputs (``pred``); ``model_version``: the served model's version, named in the
    result JSON (``data[result]``); ``ref_image``: the loaded image, whose affine the label keeps."""

    def __init__(
        self, keys: KeysCollection, model_version: Callable[[], str], result: str = "result", ref_image: str = "image"
    ) -> None:
        super().__init__(keys)
        self.model_version, self.result, self.ref_image = model_version, result, ref_image


class PlaneResultd(_ResultTransform):
    """After :class:`~lib.infers.inferers.PlanePromptInferer`: ``data[key]`` (its ``probability`` and
    ``uncertainty``, ``H x W``) becomes the mask at the image's full size (a 2D picture's array, or a volume
    zero except on the prompted slice, on the image's affine), and ``data[result]`` the result JSON: the prompt,
    the mask's size, the run's record (``data["inference"]``, its ``modality`` included), ``model_version()``, and
    with ``uncertainty`` the UGS summary."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            run = d["inference"]
            mask = (d[key]["probability"].numpy() > 0.5).astype(np.uint8)
            placed = place_plane(mask, d["spatial_shape"], d["slice"])
            result = {
                "box": [round(float(v), 2) for v in d["box"]],
                "box_source": d["box_source"],
                "slice": d["slice"],
                "foreground_pixels": int(mask.sum()),
                "encoder_cached": run["encoder_cached"],
                "encoder_s": round(run["encoder_s"], 4),
                "decoder_s": round(run["decoder_s"], 4),
                "decode_size": run["decode_size"],  # [H, W]; smaller than the image: decoded there, then upsampled
                "modality": run.get("modality"),
                "model": self.model_version(),
            }
            logger.info(
                "I-MedSAM prompt (%s box %s, slice %s): encoder %s %.3f s, decoder %.3f s",
                d["box_source"], result["box"], d["slice"], "cached" if run["encoder_cached"] else "ran",
                run["encoder_s"], run["decoder_s"],
            )  # fmt: skip
            if wants_uncertainty(d):
                result["uncertainty"] = uncertainty_summary(d[key]["uncertainty"].numpy(), mask, d["box"])
            d[key] = MetaTensor(placed, affine=d[self.ref_image].affine) if d["slice"] is not None else placed
            d[self.result] = result
        return d


class VolumeResultd(_ResultTransform):
    """After :class:`~lib.infers.inferers.VolumePromptInferer`: ``data[key]`` (its ``labels`` and ``uncertainty``
    volumes) becomes the label volume on the image's affine, and ``data[result]`` the result JSON: per object its
    prompt, the slices decoded and its voxels (with ``uncertainty``, the UGS uncertainty inside it), the slices
    the encoder ran on, the seconds, the modality and ``model_version()``."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            run, prompts = d["inference"], d["object_prompts"]
            labels, uncertainty = d[key]["labels"].numpy(), d[key]["uncertainty"].numpy()
            with_uncertainty = wants_uncertainty(d)
            objects = []
            for index, (prompt, (first, last), seed) in enumerate(zip(prompts, run["slices"], run["seed_slices"]), start=1):
                inside = labels == index
                entry = {"label": index, "source": prompt.source, "seed_slice": seed}
                if prompt.box is not None:
                    entry["box"] = [round(float(v), 2) for v in prompt.box]
                if prompt.points is not None:  # a click prompt: the clicks the prompt encoder took, [i, j, label]
                    entry["points"] = [[*(round(float(v), 2) for v in point), int(label)] for point, label in zip(prompt.points, prompt.point_labels)]
                entry.update({"slices": [first, last - 1], "voxels": int(inside.sum())})
                if with_uncertainty:
                    entry["uncertainty"] = {
                        "max": float(uncertainty.max()),
                        "mean_in_prediction": float(uncertainty[inside].mean()) if inside.any() else None,
                    }
                objects.append(entry)
            d[key] = MetaTensor(labels, affine=d[self.ref_image].affine)
            d[self.result] = {
                "objects": objects,
                "encoder_slices": run["encoder_slices"],
                "seconds": round(run["seconds"], 3),
                "modality": run.get("modality"),
                "model": self.model_version(),
            }
            logger.info(
                "I-MedSAM 3D: %d object(s), %d slice(s) encoded, %.2f s", len(prompts), run["encoder_slices"], run["seconds"]
            )
        return d
