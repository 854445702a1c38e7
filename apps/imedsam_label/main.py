"""MONAI Label app serving I-MedSAM: box-prompt annotation, UGS active learning and retraining.

    monailabel start_server --app apps/imedsam_label --studies DIR --host 127.0.0.1 \
        [--conf model_checkpoint PATH] [--conf sam_checkpoint PATH --conf encoder vit_b]
"""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import imedsam
from imedsam.inference import ImageReadError, PromptError
from imedsam.networks import CheckpointError

from lib.configs.imedsam import IMedSAMConfig
from lib.scoring.ugs import LAST_PROMPT_KEY
from lib.trainers.imedsam import TrainingDataError

logger = logging.getLogger(__name__)

MODEL_NAME = "imedsam"


class IMedSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.task_config = IMedSAMConfig()
        self.task_config.init(MODEL_NAME, self.model_dir, conf, None)
        logger.info("I-MedSAM app: %s", self.task_config.describe())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="I-MedSAM",
            description="Box-prompted segmentation with Segment Anything, LoRA, a frequency adapter and an implicit decoder",
            version=imedsam.__version__,
            labels=self.task_config.labels,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return self.task_config.infer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL_NAME: self.task_config.trainer()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {**self.task_config.strategy(), "random": Random()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return self.task_config.scoring_method()

    def infer(self, request, datastore=None):
        datastore = datastore if datastore else self.datastore()
        image = request.get("image")
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {request.get('model')!r}; this app serves {sorted(self._infers)}")
        in_datastore = isinstance(image, str) and bool(datastore.get_image_uri(image))
        if not in_datastore and not (isinstance(image, str) and os.path.exists(image)):
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        try:
            result = super().infer(request, datastore)
        except (PromptError, ImageReadError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        except CheckpointError as exc:
            raise HTTPException(status_code=500, detail=f"the served checkpoint cannot be loaded: {exc}") from exc
        if in_datastore:
            # The last box prompted on an image is the box its UGS score is computed with.
            params = result.get("params") or {}
            datastore.update_image_info(image, {LAST_PROMPT_KEY: {"box": params.get("box"), "slice": params.get("slice")}})
        return result

    def train(self, request):
        try:
            return super().train(request)
        except TrainingDataError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
