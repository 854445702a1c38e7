"""MONAI-style inferers for the infer task: one request's prompts run through the served model's cached predictor."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from imedsam.inference import ObjectPrompt, Predictor, VolumePredictor
from imedsam.networks import IMedSAM


class PredictorCache:
    """The served network's :class:`~imedsam.inference.Predictor` (and the
    :class:`~imedsam.inference.VolumePredictor` over it), kept across requests: image and slice encodings stay
    cached until the network changes (a published checkpoint loads a new one, and a new predictor follows it,
    OpenVINO graph included). Its re-entrant ``lock`` is held while a request uses the predictor."""

    def __init__(self, cache_size: int, max_decode_side: int | None, encoder_engine: str) -> None:
        self.cache_size = cache_size
        self.max_decode_side = max_decode_side
        self.encoder_engine = encoder_engine
        self.lock = threading.RLock()
        self._plane: Predictor | None = None
        self._volume: VolumePredictor | None = None

    def plane(self, network: IMedSAM) -> Predictor:
        with self.lock:
            if self._plane is None or self._plane.model is not network:
                # decode_mode None: the network's, which the app's --conf decode_mode set
                self._plane = Predictor(
                    network, self.cache_size, self.max_decode_side, decode_mode=None, encoder_engine=self.encoder_engine
                )
            return self._plane

    def volume(self, network: IMedSAM) -> VolumePredictor:
        with self.lock:
            predictor = self.plane(network)
            if self._volume is None or self._volume.predictor is not predictor:
                self._volume = VolumePredictor(predictor)
            return self._volume

    def clear(self) -> None:
        with self.lock:
            self._plane = self._volume = None


# BasicInferTask.run_inferer hands the inferer data[input_key] as a batched tensor on the request's device and
# keeps its outputs as data["pred"] after taking batch item 0 (a dict of outputs is decollated, so every value
# must be batched). The predictors hash the plane's bytes for their cache and place it on the model's device
# themselves, so the inferers take it back to numpy (a copy only on a GPU), and the facts of the run that are not
# maps (encoder cache hit, timings, decoded slices) go to ``record``, the request's data["inference"].


class PlanePromptInferer(Inferer):
    """``(plane [1, H, W, 3], network) -> {"probability", "uncertainty"}``, each ``[1, H, W]``, for one ``box``
    ``[x0, y0, x1, y1]`` on an image of ``modality`` (a name, or None); ``record`` gets ``encoder_cached``,
    ``encoder_s``, ``decoder_s`` and ``decode_size``."""

    def __init__(
        self, predictors: PredictorCache, box: Sequence[float], record: dict[str, Any], modality: str | None = None
    ) -> None:
        super().__init__()
        self.predictors, self.box, self.record, self.modality = predictors, box, record, modality

    def __call__(self, inputs: torch.Tensor, network: IMedSAM, *args, **kwargs) -> dict[str, torch.Tensor]:
        plane = inputs[0].cpu().numpy()
        with self.predictors.lock:
            predictor = self.predictors.plane(network)
            start = time.perf_counter()
            cached = predictor.set_image(plane, modality=self.modality)
            encoded = time.perf_counter()
            prediction = predictor.predict(self.box)
            decoded = time.perf_counter()
        self.record.update(
            encoder_cached=cached, encoder_s=encoded - start, decoder_s=decoded - encoded, decode_size=list(prediction.decode_size)
        )
        return {"probability": torch.from_numpy(prediction.probability)[None], "uncertainty": torch.from_numpy(prediction.uncertainty)[None]}


class VolumePromptInferer(Inferer):
    """``(volume [1, I, J, K], network) -> {"labels", "uncertainty"}``, each ``[1, I, J, K]``: object ``n`` of
    ``prompts`` is label ``n + 1``, on a volume of ``modality`` (a name, or None: also its intensity rule without a
    ``window``, see :meth:`~imedsam.inference.VolumePredictor.set_volume`); ``record`` gets ``slices`` (per object,
    ``[first, last + 1)``), ``seed_slices``, ``encoder_slices`` (slices encoded, the rest came from the cache) and
    ``seconds``."""

    def __init__(
        self,
        predictors: PredictorCache,
        prompts: Sequence[ObjectPrompt],
        window: Sequence[float] | None,
        record: dict[str, Any],
        modality: str | None = None,
    ) -> None:
        super().__init__()
        self.predictors, self.prompts, self.window, self.record, self.modality = predictors, prompts, window, record, modality

    def __call__(self, inputs: torch.Tensor, network: IMedSAM, *args, **kwargs) -> dict[str, torch.Tensor]:
        volume = inputs[0].cpu().numpy()
        with self.predictors.lock:
            session = self.predictors.volume(network)
            session.set_volume(volume, window=self.window, modality=self.modality)
            result = session.predict(self.prompts)
        self.record.update(
            slices=result.slices, seed_slices=result.seed_slices, encoder_slices=result.encoder_calls, seconds=result.seconds
        )
        labels = result.labels.astype(np.uint8 if len(self.prompts) < 256 else np.uint16)
        return {"labels": torch.from_numpy(labels)[None], "uncertainty": torch.from_numpy(result.uncertainty)[None]}
