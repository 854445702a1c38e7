"""The 3D infer task: one prompt, a whole 3D mask, each slice encoded once per volume and published model."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monai.data import MetaTensor

from imedsam.inference import VolumePredictor
from imedsam.transforms import PromptVolumed

from lib.infers.imedsam import IMedSAMInfer, wants_uncertainty

logger = logging.getLogger(__name__)


class IMedSAMVolumeInfer(IMedSAMInfer):
    """I-MedSAM on a whole volume (NIfTI, NRRD, DICOM series): one label volume for one prompt per object.

    Request fields besides MONAI Label's own (:func:`imedsam.inference.resolve_volume_prompts`):

    - ``box3d``: ``[x0, y0, z0, x1, y1, z1]`` voxel indices, upper bounds exclusive, or a list of them (label
      ``n + 1`` for the ``n``-th);
    - ``roi``: 3D Slicer's ``[i0, i1, j0, j1, k0, k1]`` (inclusive, each pair in any order) or corners
      ``[i0, j0, k0, i1, j1, k1]``; the two are told apart by which reading fits the volume, and a roi that
      fits both ways is refused unless ``roi_layout`` (``"slicer"`` or ``"corners"``) says which;
    - ``box`` with ``slice``: a 2D box on one slice; the propagation finds where the object ends;
    - ``foreground`` (and ``background``) clicks ``[i, j, k]``: two foreground clicks on one slice are a box's
      opposite corners; a background click that the mask would cover stops the walk before that slice;
    - ``window`` ``[low, high]``; ``uncertainty`` (true: add the uncertainty summary).

    The result is the label volume on the image's grid (``result_extension`` ``.nii.gz``, ``.nrrd``, ...), and
    the result JSON says per object which slices were decoded, how many slices the encoder ran on, and,
    with ``uncertainty``, the UGS uncertainty inside the mask. Slice encodings stay cached across requests on
    the same volume (up to ``cache_slices``).
    """

    def __init__(self, *args, cache_slices: int = 384, **kwargs) -> None:
        kwargs.setdefault("description", "I-MedSAM in 3D: one box, roi or two clicks give a whole 3D mask")
        super().__init__(*args, cache_size=cache_slices, **kwargs)
        self.dimension = 3
        self._session: VolumePredictor | None = None

    def pre_transforms(self, data=None):
        return [PromptVolumed(keys="image", window=self.window)]

    def clear_cache(self):
        with self._lock:
            super().clear_cache()
            self._session = None

    def _volume_session(self, device) -> VolumePredictor:
        predictor = self._plane_predictor(device)
        if self._session is None or self._session.predictor is not predictor:
            self._session = VolumePredictor(predictor)
        return self._session

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cpu"):
        prompts = data["object_prompts"]
        with self._lock:
            session = self._volume_session(device)
            session.set_volume(data["volume"], window=data["window"])
            result = session.predict(prompts)
        image = data["image"]
        data["pred"] = MetaTensor(result.labels.astype(np.uint8 if len(prompts) < 256 else np.uint16), affine=image.affine)
        with_uncertainty = wants_uncertainty(data)
        objects = []
        for index, (prompt, (first, last)) in enumerate(zip(prompts, result.slices), start=1):
            inside = result.labels == index
            entry = {
                "label": index, "source": prompt.source, "seed_slice": prompt.seed_slice,
                "box": [round(float(v), 2) for v in prompt.box], "slices": [first, last - 1], "voxels": int(inside.sum()),
            }
            if with_uncertainty:
                entry["uncertainty"] = {
                    "max": float(result.uncertainty.max()),
                    "mean_in_prediction": float(result.uncertainty[inside].mean()) if inside.any() else None,
                }
            objects.append(entry)
        data["result"] = {
            "objects": objects,
            "encoder_slices": result.encoder_calls,
            "seconds": round(result.seconds, 3),
            "model": self.model_version(),
        }
        logger.info("I-MedSAM 3D: %d object(s), %d slice(s) encoded, %.2f s", len(prompts), result.encoder_calls, result.seconds)
        return data
