"""MONAI Label app serving I-MedSAM: box-prompt annotation, UGS active learning and retraining.

    monailabel start_server --app apps/imedsam_label --studies DIR --host 127.0.0.1 \
        [--conf model_checkpoint PATH] [--conf sam_checkpoint PATH --conf encoder vit_b]

or ``python apps/imedsam_label/serve.py`` with the same arguments: the same app on uvicorn with bounded
connections (idle, slow and too many clients; see serve.py).
"""

from __future__ import annotations

import logging
import os

from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import imedsam
from imedsam.inference import ImageReadError, PromptError
from imedsam.networks import CheckpointError

from lib.configs.imedsam import IMedSAMConfig
from lib.infers.modality import IMAGE_CODE_KEY, ModalityRequestError, image_modality_code
from lib.server.body_limit import MIB, RequestBodyLimit
from lib.server.datastore import CheckedDatastore, DatastoreRequestError
from lib.server.dicomweb import CheckedDICOMWebDatastore, install_store_error_answers
from lib.server.guard import install, install_label_save, install_model_upload, install_off_loop
from lib.server.model_upload import publish_checkpoint
from lib.server.storage import PromptRecords, remove_stale_temporaries, remove_stale_uploads
from lib.trainers.imedsam import TrainingDataError

logger = logging.getLogger(__name__)

MODEL_NAME = "imedsam"


class IMedSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        remove_stale_temporaries(self.model_dir, logger)
        # uploads live here only while their request runs (lib.server.guard removes each request's folder; those
        # of requests a killed server was running are removed here)
        self.upload_root = os.path.join(app_dir, "uploads")
        remove_stale_uploads(self.upload_root, logger)
        self.prompt_records = PromptRecords(os.path.join(self.model_dir, "last_prompts.json"), logger)
        self.task_config = IMedSAMConfig()
        self.task_config.init(MODEL_NAME, self.model_dir, conf, None, prompt_records=self.prompt_records)
        logger.info("I-MedSAM app: %s", self.task_config.describe())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="I-MedSAM",
            description="Box-prompted segmentation with Segment Anything, LoRA, a frequency adapter and an implicit decoder",
            version=imedsam.__version__,
            # the app's label names in index order: OHIF's MONAI Label panel reads /info/'s labels as a list
            labels=sorted(self.task_config.labels, key=self.task_config.labels.get),
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # the datastore scans for the file endings uploads are checked against (lib.server.datastore.SUFFIXES), not
        # MONAI Label's MONAI_LABEL_DATASTORE_FILE_EXT: one list, so a rescan finds every file an upload stored
        return CheckedDatastore(
            self.studies,
            self.task_config.labels,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        """MONAI Label's DICOMweb datastore, its client and settings made as MONAI Label makes them, with the app's
        safe save path and cache (lib.server.dicomweb.CheckedDICOMWebDatastore); Google's store is MONAI Label's own."""
        if "googleapis.com" in self.studies:
            return super()._init_dicomweb_datastore()
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        self._download_dcmqi_tools()
        return CheckedDICOMWebDatastore(
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=(settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if not mode:
            return
        from monailabel.app import app as server  # the running server: this is called from its startup

        if isinstance(self.datastore(), CheckedDatastore):
            install(server, self, self.upload_root)
        else:  # DICOMweb: blocking routes off the event loop, the store's failures answered clearly, the checked model upload
            install_off_loop(server)
            install_model_upload(server, self, self.upload_root)
            install_label_save(server, self, self.upload_root)  # uploads kept per request, disk errors answered 507/503
            install_store_error_answers(server, self.studies)  # builds the middleware stack again
        # outermost, so that a body above the limit is refused before anything reads it (lib.server.body_limit)
        limit = self.task_config.max_request_bytes
        server.middleware_stack = RequestBodyLimit(server.middleware_stack, limit)
        logger.info("request bodies above %s bytes (%g MiB, --conf max_request_mb) are answered 413", f"{limit:,}", limit / MIB)

    def init_infers(self) -> dict[str, InferTask]:
        return self.task_config.infer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL_NAME: self.task_config.trainer()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {**self.task_config.strategy(), "random": Random()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return self.task_config.scoring_method()

    def _readable_by_request(self, image) -> bool:
        """An image a request may name: an id in the datastore, or a file the server itself made for this
        request (an upload, a MONAI Label session)."""
        if not isinstance(image, str):
            return False
        if self.datastore().get_image_uri(image):
            return True
        path = os.path.realpath(image)
        roots = [self.upload_root] + ([self.sessions().store_path] if self.sessions() else [])
        return any(path.startswith(os.path.realpath(root) + os.sep) for root in roots)

    def infer(self, request, datastore=None):
        datastore = datastore if datastore else self.datastore()
        image = request.get("image")
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {request.get('model')!r}; this app serves {sorted(self._infers)}")
        if not self._readable_by_request(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        # the modality the image carries, from its datastore info (which the DICOMweb datastore fills with the
        # series' tags once _readable_by_request has fetched it); set for every request, so a client cannot claim
        # one for the image: its own field is "modality"
        stored = bool(datastore.get_image_uri(image))
        request = {**request, IMAGE_CODE_KEY: image_modality_code(datastore.get_image_info(image) if stored else None)}
        try:
            result = super().infer(request, datastore)
        except (PromptError, ImageReadError, DatastoreRequestError, ModalityRequestError) as exc:
            raise HTTPException(status_code=getattr(exc, "status", 400), detail=str(exc)) from exc
        except CheckpointError as exc:
            raise HTTPException(status_code=500, detail=f"the served checkpoint cannot be loaded: {exc}") from exc
        if stored and request.get("model") == MODEL_NAME:
            # The last box prompted on an image is the box its UGS score is computed with. Best effort: a
            # record that cannot be written (a full disk) is logged, and the mask still goes back.
            params = result.get("params") or {}
            self.prompt_records.set(image, params.get("box"), params.get("slice"))
        return result

    def replace_model(self, model: str, path: str, name: str) -> dict:
        """``PUT /model/{model}``: serve the checkpoint ``path`` (the client's ``name``) once it is checked
        against the served network; the checkpoint it replaces is kept (lib.server.model_upload)."""
        published = self.model_file(model, validate=False)
        return publish_checkpoint(self.task_config.network, path, published, name)

    def train(self, request):
        try:
            # checked here, before MONAI Label queues a run: a bad field is a 400 naming it
            self._trainers[MODEL_NAME].settings(request)
            return super().train(request)
        except TrainingDataError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
