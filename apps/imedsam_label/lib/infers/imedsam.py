"""The box-prompt infer task: one 2D plane per request, the image encoding cached between prompts."""

from __future__ import annotations

import base64
import copy
import io
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from imedsam.inference import Predictor, place_plane
from imedsam.metrics import ugs_score
from imedsam.networks import IMedSAM
from imedsam.transforms import PromptPlaned

logger = logging.getLogger(__name__)


class IMedSAMInfer(BasicInferTask):
    """I-MedSAM on one slice or picture, prompted by a box (``box``, ``roi``, or two corner clicks).

    Request fields besides MONAI Label's own: ``box`` / ``roi`` / ``foreground`` (the prompt, see
    :func:`imedsam.inference.resolve_box_prompt`), ``slice`` (volumes), ``window`` (``[low, high]`` intensity
    window), ``uncertainty`` (true: add the UGS uncertainty map to the result JSON).

    The result label has the image's full size: a 2D mask for a picture, or a volume that is zero except
    on the prompted slice. The image encoder runs once per (plane, model weights): a second prompt on the
    same image skips it, and publishing a new checkpoint reloads the model and empties the cache.
    """

    def __init__(
        self,
        network: IMedSAM,
        path: list[str],
        labels: dict[str, int],
        model_version,
        window=None,
        cache_size: int = 8,
        max_decode_side: int | None = 1024,
        encoder_engine: str = "auto",
        description: str = "I-MedSAM: box-prompted 2D segmentation with an uncertainty map",
    ) -> None:
        super().__init__(
            path=path,
            network=network,
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=2,
            description=description,
            config={"uncertainty": False},
            load_strict=True,
        )
        self.window = window
        self.cache_size = cache_size
        self.max_decode_side = max_decode_side
        self.encoder_engine = encoder_engine
        self.model_version = model_version
        self._lock = threading.RLock()
        self._predictor: Predictor | None = None

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data=None):
        return [PromptPlaned(keys="image", window=self.window)]

    def inferer(self, data=None):
        return None  # run_inferer below drives the network through the cached predictor

    def post_transforms(self, data=None):
        return []

    def _get_network(self, device, data):
        # Differs from BasicInferTask._get_network where it must: the checkpoint is read as data
        # (load_checkpoint: weights_only, a named error for a bad file), a request cannot name another model
        # file (its model_filename is ignored), and the cache is keyed by the file's mtime in nanoseconds
        # under a lock, so a retrained model published within the same second is still picked up.
        path = self.get_path()
        stamp = (path, os.stat(path).st_mtime_ns) if path else (None, 0)
        with self._lock:
            cached = self._networks.get(device)
            if cached is not None and cached[1] == stamp:
                return cached[0]
            network = copy.deepcopy(self.network)
            if path:
                logger.info("loading I-MedSAM checkpoint %s", path)
                network.load_checkpoint(path)  # CheckpointError names a missing, corrupt or mismatched file
            network = network.to(torch.device(device)).eval()
            self._networks[device] = (network, stamp)
            return network

    def clear_cache(self):
        with self._lock:
            super().clear_cache()
            self._predictor = None

    def _plane_predictor(self, device) -> Predictor:
        network = self._get_network(device, None)
        if self._predictor is None or self._predictor.model is not network:
            # decode_mode None: the network's, which the app's --conf decode_mode set
            # a new network (a published checkpoint) gets a new predictor, so the OpenVINO graph follows it
            self._predictor = Predictor(
                network, self.cache_size, self.max_decode_side, decode_mode=None, encoder_engine=self.encoder_engine
            )
        return self._predictor

    def can_propose_boxes(self, device="cpu") -> bool:
        """Whether the served model has a trained box-proposal head."""
        head = self._get_network(device, None).box_proposal
        return head is not None and head.is_trained

    def propose_box(self, data: dict[str, Any], device="cpu") -> tuple[list[float], float]:
        """The served model's proposed box for ``data["plane"]`` (``[x0, y0, x1, y1]`` in its pixels) and its
        confidence; the plane's encoding stays cached for the prompt that follows."""
        with self._lock:
            predictor = self._plane_predictor(device)
            predictor.set_image(data["plane"])
            box, confidence = predictor.propose_box()
        return [float(v) for v in box], confidence

    def predict_plane(self, data: dict[str, Any], device="cpu") -> dict[str, Any]:
        """Run the model on ``data["plane"]`` with ``data["box"]``; probability and uncertainty, ``H x W``."""
        with self._lock:
            self._plane_predictor(device)
            start = time.perf_counter()
            cached = self._predictor.set_image(data["plane"])
            encoded = time.perf_counter()
            prediction = self._predictor.predict(data["box"])
            decoded = time.perf_counter()
        return {
            "decode_size": list(prediction.decode_size),
            "probability": prediction.probability,
            "uncertainty": prediction.uncertainty,
            "encoder_cached": cached,
            "encoder_s": encoded - start,
            "decoder_s": decoded - encoded,
        }

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cpu"):
        out = self.predict_plane(data, device)
        mask = (out["probability"] > 0.5).astype(np.uint8)
        pred = place_plane(mask, data["spatial_shape"], data["slice"])
        image = data["image"]
        data["pred"] = MetaTensor(pred, affine=image.affine) if data["slice"] is not None else pred
        result = {
            "box": [round(float(v), 2) for v in data["box"]],
            "box_source": data["box_source"],
            "slice": data["slice"],
            "foreground_pixels": int(mask.sum()),
            "encoder_cached": out["encoder_cached"],
            "encoder_s": round(out["encoder_s"], 4),
            "decoder_s": round(out["decoder_s"], 4),
            "decode_size": out["decode_size"],  # [H, W]; smaller than the image: decoded there, then upsampled
            "model": self.model_version(),
        }
        logger.info(
            "I-MedSAM prompt (%s box %s, slice %s): encoder %s %.3f s, decoder %.3f s",
            data["box_source"], result["box"], data["slice"], "cached" if out["encoder_cached"] else "ran",
            out["encoder_s"], out["decoder_s"],
        )
        if wants_uncertainty(data):
            result["uncertainty"] = uncertainty_summary(out["uncertainty"], mask, data["box"])
        data["result"] = result
        return data


def wants_uncertainty(data: dict[str, Any]) -> bool:
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
