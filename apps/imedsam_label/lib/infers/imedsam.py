"""The box-prompt infer task, 2D (one plane per request) or 3D (a whole volume per request), with the image and
slice encodings cached between prompts."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from imedsam.networks import IMedSAM
from imedsam.transforms import PromptPlaned, PromptVolumed

from lib.infers.inferers import PlanePromptInferer, PredictorCache, VolumePromptInferer
from lib.infers.modality import MODALITY_KEY, ResolveModalityd
from lib.transforms.results import PlaneResultd, VolumeResultd

logger = logging.getLogger(__name__)

DESCRIPTIONS = {
    2: "I-MedSAM: box-prompted 2D segmentation with an uncertainty map",
    3: "I-MedSAM in 3D: one box, roi or two clicks give a whole 3D mask",
}


class IMedSAMInfer(BasicInferTask):
    """I-MedSAM prompted by a box: ``dimension=2`` on one slice or picture, ``dimension=3`` on a whole volume.

    MONAI Label's hooks do the work: :meth:`pre_transforms` load the image and read the prompt
    (:class:`~imedsam.transforms.PromptPlaned` or :class:`~imedsam.transforms.PromptVolumed`), :meth:`inferer`
    binds the request's prompt to the model's cached predictor (:mod:`lib.infers.inferers`), and
    :meth:`post_transforms` put the mask on the image's grid and write the result JSON
    (:mod:`lib.transforms.results`).

    2D request fields besides MONAI Label's own: ``box`` / ``roi`` / ``foreground`` (the prompt, see
    :func:`imedsam.inference.resolve_box_prompt`), ``slice`` (volumes), ``window`` (``[low, high]`` intensity
    window), ``uncertainty`` (true: add the UGS uncertainty map to the result JSON), ``modality`` (a modality
    name or DICOM code; see below). The result label has the image's full size: a 2D mask for a picture, or a
    volume that is zero except on the prompted slice.

    3D request fields (:func:`imedsam.inference.resolve_volume_prompts`), for volumes (NIfTI, NRRD, DICOM series):

    - ``box3d``: ``[x0, y0, z0, x1, y1, z1]`` voxel indices, upper bounds exclusive, or a list of them (label
      ``n + 1`` for the ``n``-th);
    - ``roi``: 3D Slicer's ``[i0, i1, j0, j1, k0, k1]`` (inclusive, each pair in any order) or corners
      ``[i0, j0, k0, i1, j1, k1]``; the two are told apart by which reading fits the volume, and a roi that
      fits both ways is refused unless ``roi_layout`` (``"slicer"`` or ``"corners"``) says which;
    - ``box`` with ``slice``: a 2D box on one slice; the propagation finds where the object ends;
    - ``foreground`` (and ``background``) clicks ``[i, j, k]``: one foreground click on a slice prompts the model
      with the click itself (through SAM's prompt encoder: a model trained with clicks, such as the
      ``all_modalities_clicks`` weight set), two on one slice are a box's opposite corners; ``clicks``
      (``"auto"``, ``"points"`` or ``"corners"``) says otherwise; a background click that the mask would cover
      stops the walk before that slice;
    - ``window`` ``[low, high]``; ``uncertainty`` (true: add the uncertainty summary); ``modality``.

    The 3D result is the label volume on the image's grid (``result_extension`` ``.nii.gz``, ``.nrrd``, ...), and
    the result JSON says per object which slices were decoded, how many slices the encoder ran on, and, with
    ``uncertainty``, the UGS uncertainty inside the mask.

    The image's modality (:mod:`lib.infers.modality`) is the request's ``modality``, else the image's own (its
    datastore info, or a DICOM series' ``Modality`` tag), else ``modality`` (the app's ``--conf modality``), else
    none; a model with a modality prompt uses it, and without a window it picks a volume's intensity rule (CT's
    window for ct, the percentiles for any other). The result JSON names it (``modality``, null for none).

    The image encoder runs once per (plane, model weights), up to ``cache_size`` planes (default 8 in 2D, 384
    slices in 3D): a second prompt on the same image or volume skips it, and publishing a new checkpoint reloads
    the model and empties the cache.
    """

    def __init__(
        self,
        network: IMedSAM,
        path: list[str],
        labels: dict[str, int],
        model_version,
        dimension: int = 2,
        window=None,
        cache_size: int | None = None,
        max_decode_side: int | None = 1024,
        encoder_engine: str = "auto",
        description: str | None = None,
        modality: str | None = None,
    ) -> None:
        if dimension not in DESCRIPTIONS:
            raise ValueError(f"dimension must be 2 or 3, got {dimension!r}")
        super().__init__(
            path=path,
            network=network,
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=dimension,
            description=description or DESCRIPTIONS[dimension],
            input_key="plane" if dimension == 2 else "volume",  # what PromptPlaned / PromptVolumed add
            config={"uncertainty": False},
            load_strict=True,
        )
        self.window = window
        self.modality = ResolveModalityd(modality)
        self.model_version = model_version
        if cache_size is None:
            cache_size = 8 if dimension == 2 else 384
        self._predictors = PredictorCache(cache_size, max_decode_side, encoder_engine)
        self._lock = self._predictors.lock

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data=None):
        if self.dimension == 2:
            return [self.modality, PromptPlaned(keys="image", window=self.window, modality_key=MODALITY_KEY)]
        return [self.modality, PromptVolumed(keys="image", window=self.window)]

    def inferer(self, data=None):
        # what the run says besides its maps, for the post transforms
        data["inference"] = record = {"modality": data[MODALITY_KEY]}
        if self.dimension == 2:
            return PlanePromptInferer(self._predictors, data["box"], record, data[MODALITY_KEY])
        return VolumePromptInferer(self._predictors, data["object_prompts"], data["window"], record, data[MODALITY_KEY])

    def post_transforms(self, data=None):
        result = PlaneResultd if self.dimension == 2 else VolumeResultd
        return [result(keys=self.output_label_key, model_version=self.model_version, result=self.output_json_key)]

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
            self._predictors.clear()

    # UGS scoring (lib.scoring.ugs) prompts planes with the 2D task outside MONAI Label's request flow

    def can_propose_boxes(self, device="cpu") -> bool:
        """Whether the served model has a trained box-proposal head."""
        head = self._get_network(device, None).box_proposal
        return head is not None and head.is_trained

    def propose_box(self, data: dict[str, Any], device="cpu") -> tuple[list[float], float]:
        """The served model's proposed box for ``data["plane"]`` (``[x0, y0, x1, y1]`` in its pixels; with
        ``data[MODALITY_KEY]``, see :class:`~lib.infers.modality.ResolveModalityd`) and its confidence; the plane's
        encoding stays cached for the prompt that follows."""
        with self._lock:
            predictor = self._predictors.plane(self._get_network(device, None))
            predictor.set_image(data["plane"], modality=data.get(MODALITY_KEY))
            box, confidence = predictor.propose_box()
        return [float(v) for v in box], confidence

    def predict_plane(self, data: dict[str, Any], device="cpu") -> dict[str, Any]:
        """Run the model on ``data["plane"]`` with ``data["box"]`` (and ``data[MODALITY_KEY]``): probability and
        uncertainty (``H x W``) and the run's record (``encoder_cached``, ``encoder_s``, ``decoder_s``,
        ``decode_size``)."""
        record: dict[str, Any] = {}
        inferer = PlanePromptInferer(self._predictors, data["box"], record, data.get(MODALITY_KEY))
        maps = inferer(torch.from_numpy(data["plane"])[None], self._get_network(device, None))
        return {"probability": maps["probability"][0].numpy(), "uncertainty": maps["uncertainty"][0].numpy(), **record}
