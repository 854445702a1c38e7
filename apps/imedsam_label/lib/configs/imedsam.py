"""I-MedSAM task config: the network from the bundle's configs, its checkpoints, and the app's tasks."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.config import TaskConfig

from imedsam.data import headers, normalize_modality, pictures
from imedsam.inference import ENCODER_ENGINES
from imedsam.networks import WEIGHT_SETS

from lib.activelearning.ugs import UGSStrategy
from lib.infers.imedsam import IMedSAMInfer
from lib.scoring.ugs import UGSScoring
from lib.server.body_limit import MIB, default_request_limit
from lib.trainers.imedsam import IMedSAMTrainer

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "bundle"))


def _window(value: str | None):
    if not value:
        return None
    try:
        low, high = (float(v) for v in value.replace("[", "").replace("]", "").split(","))
    except ValueError:
        raise ValueError(f"--conf window must be 'low,high' (e.g. -160,240), got {value!r}") from None
    return [low, high]


def _whole_number(conf: dict[str, str], key: str, default: int, minimum: int = 1) -> int:
    value = conf.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        rule = "a positive whole number" if minimum == 1 else f"a whole number of at least {minimum}"
        raise ValueError(f"--conf {key} must be {rule}, got {value!r}")
    return number


def _flag(conf: dict[str, str], key: str) -> bool:
    value = str(conf.get(key, "false")).strip().lower()
    if value not in ("true", "false", "1", "0", ""):
        raise ValueError(f"--conf {key} must be true or false, got {conf.get(key)!r}")
    return value in ("true", "1")


def conf_modality(conf: dict[str, str]) -> str | None:
    """``--conf modality``: the images' modality when neither the request nor the image says (a name or DICOM
    code, normalized), or None; a bad value is an error naming the key and the accepted names."""
    try:
        return normalize_modality(conf.get("modality"))
    except ValueError as exc:
        raise ValueError(f"--conf modality: {exc}") from None


def conf_modality_temperature(conf: dict[str, str]) -> float:
    """``--conf modality_temperature`` (default 0.0): training draws modality ``k`` with probability proportional
    to ``n_k ** (1 - temperature)`` (:class:`imedsam.data.ModalityBalancedSampler`); 0 keeps the data's
    proportions (plain shuffling: on the shared data, balancing lost to it on every modality, docs/results.md),
    1 draws the modalities equally."""
    value = conf.get("modality_temperature")
    if value is None or value == "":
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"--conf modality_temperature must be a number from 0 to 1, got {value!r}")
    return number


def conf_request_limit(conf: dict[str, str], network=None) -> int:
    """``--conf max_request_mb``: the largest request body in bytes (given in MiB); by default the largest image
    the app accepts or a checkpoint of ``network``, whichever is larger, with room for the form around it
    (:func:`lib.server.body_limit.default_request_limit`). Read after ``max_image_voxels`` / ``max_image_pixels``
    are applied, so the default follows them."""
    if conf.get("max_request_mb"):
        return _whole_number(conf, "max_request_mb", 1) * MIB
    return default_request_limit(network)


def network_overrides(conf: dict[str, str]) -> dict[str, Any]:
    """The bundle's network keys that ``--conf`` sets (see ``bundle/configs/train.yaml``), with the app's defaults."""
    encoder = conf.get("encoder", "lite_medsam")
    weights = conf.get("weights") or None
    prompts = {
        "modality_prompt": _flag(conf, "modality_prompt"), "content_prompt": _flag(conf, "content_prompt"),
        # LoRA in SAM's two-way transformer (a click-trained model's): must match the checkpoint
        "decoder_lora_rank": _whole_number(conf, "decoder_lora_rank", 0, minimum=0),
    }  # fmt: skip
    if weights is not None:
        if weights not in WEIGHT_SETS:
            raise ValueError(f"--conf weights {weights!r}: not a weight set of this package ({', '.join(sorted(WEIGHT_SETS)) or 'none'})")
        if encoder != "lite_medsam":
            raise ValueError(f"--conf weights {weights!r} is a fine-tuned lite_medsam; it does not go with --conf encoder {encoder}")
        prompts.update(WEIGHT_SETS[weights].options)  # the set says which prompt tokens it has
    return {
        "encoder": encoder,
        "weights": weights,
        "image_size": _whole_number(conf, "image_size", 256 if encoder == "lite_medsam" else 384),
        # how prompts are decoded
        "decode_mode": conf.get("decode_mode", "adaptive"),
        "adaptive_points": _whole_number(conf, "adaptive_points", 4096),
        "decoder_precision": conf.get("decoder_precision", "auto"),
        "encoder_precision": conf.get("encoder_precision", "auto"),
        # MCP-MedSAM's prompt tokens: must match the checkpoint
        **prompts,
        # 3DSAM-adapter's volumetric adapters (bundle/configs/train_volume.yaml): must match the checkpoint
        "volumetric_adapter": _flag(conf, "volumetric_adapter"),
        "slab_depth": _whole_number(conf, "slab_depth", 5),
        "volumetric_blocks": conf.get("volumetric_blocks", "all"),
    }


class IMedSAMConfig(TaskConfig):
    """``--conf`` keys (all optional):

    - ``bundle``: the MONAI bundle folder whose ``configs/train.yaml`` defines the network and training
      (default: the project's ``bundle/``);
    - ``encoder`` (``lite_medsam``), ``image_size`` (256 for lite_medsam, else 384), ``sam_checkpoint``: the
      network, as in the bundle;
    - ``decode_mode`` (``adaptive`` or ``exact``), ``decoder_precision`` and ``encoder_precision`` (``auto``,
      ``float32`` or ``bfloat16``): how prompts are decoded and images encoded (adaptive answers several
      times faster than exact, within 0.001 Dice on Kvasir-Sessile; UGS scoring always decodes exactly);
      ``adaptive_points`` (4096): the points the adaptive mode evaluates at the output's level; fewer answer
      faster on a slow CPU for a measured loss of Dice (``docs/speed.md``);
    - ``encoder_engine`` (``auto``, ``torch`` or ``openvino``): what runs the image encoder for prompts; ``auto``
      is OpenVINO for ``lite_medsam`` on a CPU (several times faster; converted once per published model and
      kept in ``$IMEDSAM_CACHE_DIR``, default ``~/.cache/imedsam``), PyTorch elsewhere;
    - ``weights``: a weight set the package carries (``all_modalities``: lite_medsam fine-tuned on every shared
      modality, with its modality and content prompts, which the set switches on), served until a checkpoint is
      given or trained, and where training starts;
    - ``model_checkpoint``: a trained I-MedSAM state dict; without it (and before the first training run)
      ``lite_medsam`` serves LiteMedSAM's pretrained weights (I-MedSAM's warm start, which segments as
      LiteMedSAM does) and the random-init presets warn that their masks are meaningless; once training
      publishes ``model/imedsam.pt``, that file is served;
    - ``label`` (``object``): the segment name clients show; ``window`` (``low,high``): intensity window for
      volumes (default, LiteMedSAM's: CT L40/W400, other volumes the 0.5-99.5 percentiles of their non-zero
      voxels);
    - ``max_image_pixels`` (50,000,000): larger images and volume planes are refused (400) before they are
      decoded; ``max_image_voxels`` (268,435,456, 512 x 512 x 1024): larger volumes are refused (400) from
      their header when they are uploaded or labelled; ``max_decode_side`` (1024): larger outputs are decoded at that size and upsampled, so that one
      request's time and memory stay bounded;
    - ``max_request_mb`` (default: the largest image accepted, 1 GiB of float32 voxels at the default
      ``max_image_voxels``, or a checkpoint of the served network if larger, plus 64 MiB): a request body above
      it is answered 413 from its ``Content-Length`` before any of it is read, or cut off there when it has none;
    - ``cache_slices`` (384): slice encodings the 3D task keeps (4 MiB each for ``lite_medsam``), so that
      objects and requests on one volume encode each slice once;
    - ``seed`` (0): the seed of untrained weights, so that the server and its training and scoring
      subprocesses build the same untrained model;
    - ``modality`` (none): the images' modality (a name such as ``mr`` or a DICOM code such as ``MR``) for a
      request that names none on an image that carries none (no DICOM ``Modality`` tag, no ``modality`` in its
      datastore info); ``modality_prompt`` / ``content_prompt`` (false): the network has MCP-MedSAM's modality /
      content token (must match the checkpoint); ``modality_temperature`` (0.0): training's modality-balanced
      sampling, when the labelled images fall in more than one modality;
    - ``decoder_lora_rank`` (0): LoRA in SAM's two-way transformer, as a model trained with clicks has it
      (``click_prob`` in the bundle; must match the checkpoint; a weight set states its own);
    - ``volumetric_adapter`` (false), ``slab_depth`` (5), ``volumetric_blocks`` (``all``): the network has
      3DSAM-adapter's volumetric adapters, trained with ``bundle/configs/train_volume.yaml`` (must match the
      checkpoint); the 3D task then encodes each volume in slabs of ``slab_depth`` neighbouring slices. The app's
      own retraining trains on single slices (slabs of one), which leaves the adapters nothing to see: retrain
      such a model with the bundle.
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.bundle_dir = os.path.abspath(conf.get("bundle", DEFAULT_BUNDLE))
        train_config = os.path.join(self.bundle_dir, "configs", "train.yaml")
        if not os.path.isfile(train_config):
            raise FileNotFoundError(f"--conf bundle {self.bundle_dir}: {train_config} not found")
        self.labels = {conf.get("label", "object"): 1}
        self.window = _window(conf.get("window"))
        self.modality = conf_modality(conf)
        self.modality_temperature = conf_modality_temperature(conf)
        if conf.get("max_image_pixels"):
            pictures.MAX_IMAGE_PIXELS = _whole_number(conf, "max_image_pixels", pictures.MAX_IMAGE_PIXELS)
        if conf.get("max_image_voxels"):
            headers.MAX_IMAGE_VOXELS = _whole_number(conf, "max_image_voxels", headers.MAX_IMAGE_VOXELS)
        self.max_decode_side = int(conf.get("max_decode_side", 1024))
        self.encoder_engine = conf.get("encoder_engine", "auto")
        if self.encoder_engine not in ENCODER_ENGINES:
            raise ValueError(f"--conf encoder_engine must be one of {ENCODER_ENGINES}, got {self.encoder_engine!r}")
        sam_checkpoint = conf.get("sam_checkpoint") or None
        if sam_checkpoint and not os.path.isfile(sam_checkpoint):
            raise FileNotFoundError(f"--conf sam_checkpoint {sam_checkpoint}: file not found")
        self.network_overrides = network_overrides(conf)
        encoder = self.network_overrides["encoder"]
        self.network_overrides["sam_checkpoint"] = os.path.abspath(sam_checkpoint) if sam_checkpoint else None
        self.network = self._build_network(int(conf.get("seed", 0)))
        self.max_request_bytes = conf_request_limit(conf, self.network)

        self.published = os.path.join(model_dir, f"{name}.pt")
        given = conf.get("model_checkpoint") or None
        if given and not os.path.isfile(given):
            raise FileNotFoundError(f"--conf model_checkpoint {given}: file not found")
        self.path = ([os.path.abspath(given)] if given else []) + [self.published]
        if not given and not os.path.isfile(self.published) and encoder == "lite_medsam":
            logger.info("no I-MedSAM checkpoint yet: serving the pretrained lite_medsam start (LiteMedSAM's weights)")
        elif not given and not os.path.isfile(self.published):
            logger.warning(
                "no I-MedSAM checkpoint (--conf model_checkpoint PATH) and none trained yet: serving an UNTRAINED %s; "
                "its masks are meaningless until you train or pass a checkpoint",
                self.network_overrides["encoder"],
            )
        served = dict(
            window=self.window, max_decode_side=self.max_decode_side, encoder_engine=self.encoder_engine, modality=self.modality
        )
        self._infer = IMedSAMInfer(self.network, self.path, self.labels, self.model_version, dimension=2, **served)
        self._infer_3d = IMedSAMInfer(
            self.network, self.path, self.labels, self.model_version, dimension=3,
            cache_size=_whole_number(conf, "cache_slices", 384), **served,
        )  # fmt: skip

    def _build_network(self, seed: int):
        parser = ConfigParser()
        parser.read_config(os.path.join(self.bundle_dir, "configs", "train.yaml"))
        parser.update({"bundle_root": self.bundle_dir, **self.network_overrides})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = parser.get_parsed_content("network_def")
        for key in ("modality_prompt", "content_prompt"):
            if self.network_overrides[key] and getattr(network.prompt_path, key, None) is None:
                raise ValueError(
                    f"--conf {key} true, but the bundle {self.bundle_dir} builds no {key} (its train.yaml has no {key} key)"
                )
        return network

    def model_version(self) -> str:
        # MONAI Label's get_path: the last of self.path that exists, i.e. the published checkpoint once
        # training has written one, else model_checkpoint
        path = self._infer.get_path()
        if path:
            return f"{os.path.basename(path)}@{os.stat(path).st_mtime_ns}"
        if self.network_overrides["weights"]:
            return f"weights:{self.network_overrides['weights']}"
        return "pretrained" if self.network_overrides["encoder"] == "lite_medsam" else "untrained"

    def infer(self):
        return {self.name: self._infer, f"{self.name}_3d": self._infer_3d}

    def trainer(self):
        return IMedSAMTrainer(
            bundle_dir=self.bundle_dir,
            model_dir=self.model_dir,
            publish_path=self.published,
            network_overrides=self.network_overrides,
            start_from=self._infer.get_path,
            window=self.window,
            modality=self.modality,
            modality_temperature=self.modality_temperature,
        )

    def strategy(self):
        return {"ugs": UGSStrategy(self.model_version)}

    def scoring_method(self):
        return {"ugs": UGSScoring(self._infer, self.kwargs["prompt_records"])}

    def describe(self) -> str:
        return json.dumps({"bundle": self.bundle_dir, **self.network_overrides, "checkpoints": self.path})
