"""UGS scoring: how unsure the model is about each unlabeled image, stored in the datastore."""

from __future__ import annotations

import logging
import time

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.utils.others.generic import name_to_device

from imedsam.inference import ImageReadError, PromptError
from imedsam.metrics import ugs_score
from imedsam.transforms import PromptPlaned

from lib.infers.imedsam import IMedSAMInfer
from lib.infers.modality import IMAGE_CODE_KEY, MODALITY_KEY, image_modality_code, resolve_modality
from lib.server.storage import PromptRecords

logger = logging.getLogger(__name__)

SCORE_KEY = "ugs_score"
MODEL_KEY = "ugs_model"


def prompt_for(last: dict | None) -> tuple[dict, str]:
    """The prompt used to score an image: its last user prompt if any, else none (``"unprompted"``): the
    scorer then proposes a box, or takes the whole image when the model cannot propose one."""
    if last and last.get("box") is not None:
        return {"box": last["box"], "slice": last.get("slice")}, "last_prompt"
    return {}, "unprompted"  # PromptPlaned gives the whole image (a volume's middle slice) as the plane


class UGSScoring(ScoringMethod):
    """Score unlabeled images by the mean UGS (MC-dropout) variance over the predicted region in the box.

    The box is the last box a user prompted on the image (the app's :class:`PromptRecords`). For an image
    nobody has prompted (a volume: its middle slice) it is the box the model's box-proposal head proposes,
    the kind of prompt the model sees in use; a model whose head is untrained (a checkpoint from before the
    head, or the pretrained start before any training) scores it in the whole image instead. The image's
    info records which: ``ugs_box_source`` is ``last_prompt``, ``proposed_box`` (with
    ``ugs_box_confidence``) or ``whole_image``, beside ``ugs_score`` and ``ugs_model``, the model version the
    score was computed with; an image is scored again only when the model changes or its prompt does.
    """

    def __init__(self, infer: IMedSAMInfer, prompt_records: PromptRecords) -> None:
        super().__init__("Uncertainty-guided sampling (UGS): mean MC-dropout variance of the implicit decoder")
        self.infer = infer
        self.prompt_records = prompt_records

    def __call__(self, request, datastore: Datastore):
        version = self.infer.model_version()
        device = name_to_device(request.get("device", "cuda"))  # "cuda" falls back on the CPU without a GPU
        scored, skipped, failed = {}, 0, {}
        start = time.time()
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            prompt, source = prompt_for(self.prompt_records.get(image_id))
            code = image_modality_code(info)
            stamp = f"{version}|{prompt.get('box')}|{prompt.get('slice')}"
            modality = resolve_modality(None, code, self.infer.modality.conf_modality)
            if modality is not None:  # a modality prompt changes the score; stamps of images without one stay as they were
                stamp += f"|{modality}"
            if info.get(MODEL_KEY) == stamp and SCORE_KEY in info:
                skipped += 1
                continue
            try:
                score, box, slice_index, source, confidence = self._score(
                    datastore.get_image_uri(image_id), {**prompt, IMAGE_CODE_KEY: code}, source, device
                )
            except (PromptError, ImageReadError) as exc:
                logger.warning("UGS: cannot score %s: %s", image_id, exc)
                failed[image_id] = str(exc)
                continue
            datastore.update_image_info(
                image_id,
                {SCORE_KEY: score, MODEL_KEY: stamp, "ugs_box": box, "ugs_slice": slice_index, "ugs_box_source": source,
                 "ugs_box_confidence": confidence},
            )  # fmt: skip
            scored[image_id] = score
        logger.info("UGS: scored %d images in %.1f s (%d up to date, %d failed)", len(scored), time.time() - start, skipped, len(failed))
        return {"scored": scored, "up_to_date": skipped, "failed": failed, "model": version}

    def _score(self, path: str, prompt: dict, source: str, device: str):
        """``(score, box, slice, box source, proposal confidence or None)`` of one image; ``prompt`` may carry the
        image's own modality code (``IMAGE_CODE_KEY``), resolved as for a request."""
        data = self.infer.modality({"image": path, **prompt})
        data = PromptPlaned(window=self.infer.window, whole_image_if_unprompted=True, modality_key=MODALITY_KEY)(data)
        confidence = None
        if source == "unprompted":
            if self.infer.can_propose_boxes(device):
                box, confidence = self.infer.propose_box(data, device)
                data["box"], source = np.asarray(box, dtype=np.float32), "proposed_box"
            else:
                source = "whole_image"
        out = self.infer.predict_plane(data, device)
        mask = out["probability"] > 0.5
        box = [round(float(v), 2) for v in data["box"]]
        return ugs_score(out["uncertainty"], mask, data["box"]), box, data["slice"], source, confidence
