"""Active-learning strategy: the unlabeled image the model is least sure about."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.ugs import MODEL_KEY, SCORE_KEY

logger = logging.getLogger(__name__)


class UGSStrategy(Strategy):
    """Return the unlabeled image with the highest stored UGS score.

    Scores of the current model come first; if only older scores exist they are used and the answer says
    ``"stale": true``. With no score at all (``/scoring/ugs`` has not run yet) the rule is the first
    unlabeled image in id order, and the answer says so.
    """

    def __init__(self, model_version) -> None:
        super().__init__("Uncertainty-guided sampling: the unlabeled image with the highest UGS score")
        self.model_version = model_version

    def __call__(self, request, datastore: Datastore):
        unlabeled = sorted(datastore.get_unlabeled_images())
        if not unlabeled:
            return None
        version = self.model_version()
        current, stale = [], []
        for image_id in unlabeled:
            info = datastore.get_image_info(image_id)
            if SCORE_KEY not in info:
                continue
            entry = (float(info[SCORE_KEY]), image_id)
            (current if str(info.get(MODEL_KEY, "")).startswith(f"{version}|") else stale).append(entry)
        if current or stale:
            score, image_id = min(current or stale, key=lambda entry: (-entry[0], entry[1]))
            logger.info("UGS strategy: %s (score %.6g%s)", image_id, score, "" if current else ", stale")
            return {"id": image_id, "ugs_score": score, "stale": not current, "rule": "highest UGS score"}
        logger.info("UGS strategy: no image is scored yet; returning the first unlabeled image %s", unlabeled[0])
        return {"id": unlabeled[0], "ugs_score": None, "stale": False, "rule": "no UGS scores yet: first unlabeled image by id"}
