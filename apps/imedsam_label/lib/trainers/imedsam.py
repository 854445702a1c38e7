"""Retraining from the labels users saved as ``final``, with the bundle's own training workflow."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from typing import Any

import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from PIL import Image

from imedsam.data import ModalityBalancedSampler, seeded_split
from imedsam.data.headers import VOLUME_SUFFIXES
from imedsam.data.pictures import IMAGE_EXTENSIONS
from imedsam.inference import ImageReadError, NonFiniteImageError, image_plane, is_picture, label_plane, load_image_array, spatial_shape
from imedsam.networks.prompts import ANY_MODALITY

from lib.infers.modality import dicom_series_modality, image_modality_code, resolve_modality
from lib.server.storage import copy_atomically, write_json_atomically

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The request or the datastore's final labels cannot make a training run; the message says why."""


#: a run name is a plain folder name under the app's model folder, never a path
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _whole(value, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TrainingDataError(f"{key} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise TrainingDataError(f"{key} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < least:
        raise TrainingDataError(f"{key} must be a whole number of at least {least}, got {value!r}")
    return int(number)


def _fraction(value, key: str, low: float, high: float, inclusive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TrainingDataError(f"{key} must be a number, got {value!r}") from None
    inside = low <= number <= high if inclusive else low < number < high
    if isinstance(value, bool) or not inside:
        raise TrainingDataError(f"{key} must be between {low:g} and {high:g} ({'inclusive' if inclusive else 'exclusive'}), got {value!r}")
    return number


def check_train_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The training settings with each value checked and converted; a :class:`TrainingDataError` names the
    first bad field (so the server answers 400, not 500 or a reset connection)."""
    name = settings["name"]
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise TrainingDataError(
            f"name must be a plain name of letters, digits, '_', '-' and '.' (1-64 characters, not starting with '.' "
            f"or '-'), got {name!r}"
        )
    checked = dict(settings)
    for key in ("max_epochs", "batch_size", "train_label_size", "train_query_size", "label_size"):
        checked[key] = _whole(settings[key], key, 1)
    checked["seed"] = _whole(settings["seed"], "seed", 0)
    checked["val_split"] = _fraction(settings["val_split"], "val_split", 0.0, 1.0)
    checked["learning_rate"] = _fraction(settings["learning_rate"], "learning_rate", 0.0, 1.0)
    checked["click_prob"] = _fraction(settings["click_prob"], "click_prob", 0.0, 1.0, inclusive=True)
    return checked


def _write_pair(folder: str, name: str, plane: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(np.round(plane * 255).astype(np.uint8)).save(os.path.join(folder, "images", f"{name}.png"))
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, "masks", f"{name}.png"))


#: the endings a datastore image's file name loses to name its samples, longest first (".nii.gz" before ".nii")
IMAGE_SUFFIXES = tuple(sorted({*IMAGE_EXTENSIONS, *VOLUME_SUFFIXES, ".dcm", ".mha", ".mhd"}, key=len, reverse=True))


def sample_id(image_path: str) -> str:
    """The name of a datastore image's samples: its file (or DICOM series folder) name without a known image
    ending (:data:`IMAGE_SUFFIXES`), dots inside kept, so that series folders named by UID stay apart."""
    name = os.path.basename(os.path.normpath(image_path))
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _check_sample_ids(datalist: list[dict]) -> list[str]:
    """Each item's :func:`sample_id`; two images of one name (case aside: a file system may ignore it) would
    overwrite each other's exported pairs, so they are a :class:`TrainingDataError` naming both."""
    ids, seen = [], {}
    for item in datalist:
        image_id = sample_id(item["image"])
        other = seen.setdefault(image_id.casefold(), item["image"])
        if other != item["image"]:
            raise TrainingDataError(
                f"the labeled images {other} and {item['image']} would both be exported as {image_id!r}: "
                "rename one of them, or remove one's final label"
            )
        ids.append(image_id)
    return ids


def export_training_set(datalist: list[dict], folder: str, val_split: float, seed: int, window=None) -> dict[str, Any]:
    """Write ``datalist`` (``[{"image", "label"(, "modality")}]``) as the bundle's dataset layout and return the
    split: ``{"train": [names], "val": [names], "modalities": {name: modality or None}}``. ``split.json`` holds it
    with file names (``name.png``) in its lists, since a name may hold dots (a DICOM series' UID) and
    :func:`imedsam.data.polyp_datalist` reads what follows a name's last dot as its extension.

    A sample is named by its image's :func:`sample_id` (a volume's by ``ID_sliceKKKK``); two images of one name
    are refused.

    A picture gives one image/mask pair; a volume gives one pair per slice whose label has foreground, windowed
    by ``window``, else by the item's ``modality`` (a name; CT's window for ct, the percentiles for any other), else
    by a guess from its values, as at inference. A picture or slice holding a NaN or infinite value is left out
    with a warning naming the image, the slice and the first such voxel. Samples from one image stay in the same
    split. At least two images (or, for a single volume, two labeled slices) are needed, so that validation has one.
    """
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    groups: dict[str, list[str]] = {}
    modalities: dict[str, str | None] = {}
    written: dict[str, str] = {}  # sample name (case aside) -> its image
    for item, image_id in zip(datalist, _check_sample_ids(datalist)):
        image_path, label_path = item["image"], item["label"]
        planar = is_picture(image_path)
        image = load_image_array(image_path).numpy()
        label = load_image_array(label_path).numpy()
        spatial = spatial_shape(image, planar)
        if tuple(label.shape[: len(spatial)]) != tuple(spatial):
            raise TrainingDataError(
                f"label {label_path} has shape {label.shape}, which does not match its image {image_path} {image.shape}"
            )
        slices = [None] if planar else [int(k) for k in np.nonzero((label.reshape(*spatial, -1) > 0).any(axis=(0, 1, 3)))[0]]
        names = []
        for k in slices:
            mask = label_plane(label, planar, k)
            if not mask.any():
                logger.warning("skipping %s: its final label is empty", image_path if k is None else f"{image_path} slice {k}")
                continue
            name = image_id if k is None else f"{image_id}_slice{k:04d}"
            other = written.setdefault(name.casefold(), image_path)
            if other != image_path:  # a picture named like another image's slice
                raise TrainingDataError(f"the labeled images {other} and {image_path} would both give the sample {name!r}: rename one of them")
            try:
                plane = image_plane(image, planar, k, window, item.get("modality"))
            except NonFiniteImageError as exc:  # one bad slice does not take the training down: its sample is left out
                logger.warning("skipping %s: %s", image_path if k is None else f"{image_path} slice {k}", exc)
                continue
            _write_pair(folder, name, plane, mask)
            names.append(name)
            modalities[name] = item.get("modality")
        if names:
            groups[image_id] = names
    samples = sum(len(v) for v in groups.values())
    if samples < 2:
        raise TrainingDataError(
            f"training needs at least 2 labeled images (labels saved with tag 'final' and a non-empty mask); found {samples}"
        )
    # split by image, so that the slices of one volume stay together; a single volume is split by slice
    units = {name: [name] for names in groups.values() for name in names} if len(groups) < 2 else groups
    by_unit = seeded_split(list(units), seed, (1.0 - val_split, val_split))
    split: dict[str, Any] = {key: sorted(name for unit in by_unit[key] for name in units[unit]) for key in ("train", "val")}
    split["modalities"] = {name: modalities[name] for name in split["train"] + split["val"]}  # polyp_datalist ignores it
    files = {key: [f"{name}.png" for name in split[key]] for key in ("train", "val")}
    with open(os.path.join(folder, "split.json"), "w") as f:
        json.dump({**split, **files}, f, indent=1)
    return split


def item_modalities(datalist: list[dict], datastore: Datastore, conf_modality: str | None) -> list[str | None]:
    """The modality of each ``datalist`` item (a name, or None): the image's own (its datastore info's
    ``modality`` or DICOM ``Modality``, or a DICOM series folder's tag), else ``conf_modality``; an unknown code is
    None (:func:`lib.infers.modality.resolve_modality`, as for a request that names none)."""
    codes = {}
    for image_id in datastore.get_labeled_images():
        info = datastore.get_image_info(image_id)
        if info.get("path"):
            codes[os.path.realpath(info["path"])] = image_modality_code(info)
    return [
        resolve_modality(None, codes.get(os.path.realpath(item["image"])) or dicom_series_modality(item["image"]), conf_modality)
        for item in datalist
    ]


#: the sampler's group of training samples whose modality is not known
UNKNOWN_MODALITY = "unknown"


def modality_sampler(items: list[dict], modalities: dict[str, str | None], temperature: float, seed: int) -> ModalityBalancedSampler:
    """A :class:`~imedsam.data.ModalityBalancedSampler` over the bundle's training ``items`` (``name`` keys), by
    ``modalities`` (sample name -> name or None: one group, ``UNKNOWN_MODALITY``), as many draws per epoch as
    items."""
    groups = [modalities.get(item["name"]) or UNKNOWN_MODALITY for item in items]
    return ModalityBalancedSampler(groups, temperature=temperature, seed=seed)


def sampler_overrides(split: dict[str, Any], temperature: float, seed: int) -> dict[str, Any]:
    """The bundle overrides that draw training samples with :func:`modality_sampler` instead of shuffling them,
    when the training samples carry a modality and fall in more than one group (samples of no modality are one);
    else none. With one group, or at temperature 0 (the data's own proportions), a draw is only a draw with
    replacement, and shuffling shows every sample once an epoch."""
    groups = {split["modalities"].get(name) or UNKNOWN_MODALITY for name in split["train"]}
    if len(groups) < 2 or temperature == 0:
        return {}
    return {
        "train#dataloader#shuffle": False,
        # a callable, not a dict: the config parser would read a dict of sample names as config keys
        "modality_sampler": functools.partial(modality_sampler, modalities=split["modalities"], temperature=temperature, seed=seed),
        "train#dataloader#sampler": "$@modality_sampler(@train#dataset#data)",
    }


def with_modality(items: list[dict], modalities: dict[str, str | None]) -> list[dict]:
    """The bundle's ``items`` (``name`` keys), each with its ``modality`` from ``modalities`` (sample name -> name
    or None); a sample of none gets :data:`~imedsam.networks.prompts.ANY_MODALITY`, the network's "any" token, as
    a string: a batch does not collate None."""
    return [{**item, "modality": modalities.get(item["name"]) or ANY_MODALITY} for item in items]


def modality_prompt_overrides(split: dict[str, Any], network_overrides: dict[str, Any], config_file: str) -> dict[str, Any]:
    """The bundle overrides that give each sample's modality to a network with a modality prompt
    (``network_overrides["modality_prompt"]``), so that training learns its modality tokens: the training and
    validation items of ``config_file``'s ``train#dataset#data`` and ``validate#dataset#data`` gain a ``modality``
    (:func:`with_modality`, by ``split["modalities"]``) and ``train#prepare_batch`` passes it to the inferer (which
    validation shares). Without a modality prompt, none."""
    if not network_overrides.get("modality_prompt"):
        return {}
    bundle = ConfigParser()
    bundle.read_config(config_file)
    # a callable, not a dict: the config parser would read a dict of sample names as config keys
    overrides: dict[str, Any] = {"with_modality": functools.partial(with_modality, modalities=split["modalities"])}
    for stage in ("train", "validate"):
        key = f"{stage}#dataset#data"
        overrides[f"{stage}_items_without_modality"] = bundle[key]  # the bundle's own datalist, whatever it is
        overrides[key] = f"$@with_modality(@{stage}_items_without_modality)"
    overrides["train#prepare_batch#extra_keys#modality"] = "modality"
    return overrides


class IMedSAMTrainer(TrainTask):
    """Fine-tune I-MedSAM on the datastore's ``final`` labels and publish the best checkpoint.

    The datastore's labels are exported to the bundle's dataset layout (``images/``, ``masks/``,
    ``split.json``), then the bundle's ``train.yaml`` workflow runs with the app's network settings, starting
    from the served checkpoint. When the labelled images fall in more than one modality (their own, else
    ``modality``; those of none are one group), training draws its samples with
    :class:`~imedsam.data.ModalityBalancedSampler` at ``modality_temperature`` instead of shuffling them. A network
    with a modality prompt (``network_overrides["modality_prompt"]``) is given each sample's modality ("any" when
    it has none), so that it learns its modality tokens. The best validation checkpoint is copied atomically to
    ``publish_path``, which the infer task reloads on its next request.
    """

    def __init__(
        self,
        bundle_dir: str,
        model_dir: str,
        publish_path: str,
        network_overrides: dict[str, Any],
        start_from,
        window=None,
        modality: str | None = None,
        modality_temperature: float = 0.0,
        description: str = "Fine-tune I-MedSAM on the labels saved as final",
    ) -> None:
        super().__init__(description)
        self.bundle_dir = bundle_dir
        self.model_dir = model_dir
        self.publish_path = publish_path
        self.stats_path = os.path.join(model_dir, "train_stats.json")
        self.network_overrides = dict(network_overrides)
        self.start_from = start_from
        self.window = window
        self.modality = modality
        self.modality_temperature = modality_temperature

    def config(self) -> dict[str, Any]:
        return {
            "name": "train_01",
            "max_epochs": 10,
            "val_split": 0.2,
            "batch_size": 2,
            # as the bundle's train.yaml: smaller steps fine-tune the pretrained lite_medsam
            "learning_rate": 2e-4 if self.network_overrides.get("encoder") == "lite_medsam" else 1e-3,
            "train_label_size": 128,
            "train_query_size": 64,  # label-grid rows and columns per step (docs/speed.md); = train_label_size: every pixel
            "label_size": 128,
            "seed": 0,
            # a model with LoRA in its two-way transformer was trained on clicks: keep training them, as its set was
            "click_prob": 0.75 if self.network_overrides.get("decoder_lora_rank") else 0.0,
        }

    def stats(self) -> dict[str, Any]:
        """The last run's figures; a missing, empty or corrupt file (a crash, a full disk) is logged and read as
        no run, and the next run rewrites it."""
        if not os.path.isfile(self.stats_path):
            return {}
        try:
            with open(self.stats_path) as f:
                stats = json.load(f)
            if not isinstance(stats, dict):
                raise ValueError("not a JSON object")
            return stats
        except (OSError, ValueError) as exc:
            logger.warning("training stats %s unreadable (%s): treated as no training run yet", self.stats_path, exc)
            return {}

    def settings(self, request) -> dict[str, Any]:
        """The run's settings: the defaults, overridden by the request's known keys, each checked."""
        return check_train_settings({**self.config(), **{k: v for k, v in request.items() if k in self.config()}})

    def bundle_workflow(self, settings: dict[str, Any], run_dir: str, split: dict[str, Any], initial: str | None) -> ConfigWorkflow:
        """The bundle's ``train.yaml`` workflow (not yet initialized) for the checked ``settings`` on the training
        set exported to ``run_dir/data`` (``split``), starting from ``initial``."""
        config_file = os.path.join(self.bundle_dir, "configs", "train.yaml")
        return ConfigWorkflow(
            config_file=config_file,
            meta_file=os.path.join(self.bundle_dir, "configs", "metadata.json"),
            logging_file=False,  # keep the server's logging as it is
            workflow_type="train",
            bundle_root=self.bundle_dir,
            dataset_dir=os.path.join(run_dir, "data"),
            split_file=os.path.join(run_dir, "data", "split.json"),
            ckpt_dir=os.path.join(run_dir, "models"),
            output_dir=os.path.join(run_dir, "eval"),
            initial_checkpoint=initial,
            max_epochs=int(settings["max_epochs"]),
            batch_size=int(settings["batch_size"]),
            learning_rate=float(settings["learning_rate"]),
            train_label_size=int(settings["train_label_size"]),
            train_query_size=int(settings["train_query_size"]),
            label_size=int(settings["label_size"]),
            seed=int(settings["seed"]),
            click_prob=float(settings["click_prob"]),
            val_interval=1,
            **self.network_overrides,
            **sampler_overrides(split, self.modality_temperature, int(settings["seed"])),
            **modality_prompt_overrides(split, self.network_overrides, config_file),
        )

    def __call__(self, request, datastore: Datastore):
        settings = self.settings(request)
        run_dir = os.path.join(self.model_dir, "imedsam", settings["name"])
        shutil.rmtree(os.path.join(run_dir, "data"), ignore_errors=True)
        start = time.time()
        datalist = datastore.datalist()
        items = [{**item, "modality": m} for item, m in zip(datalist, item_modalities(datalist, datastore, self.modality))]
        try:
            split = export_training_set(
                items, os.path.join(run_dir, "data"), float(settings["val_split"]), int(settings["seed"]), self.window
            )
        except ImageReadError as exc:
            raise TrainingDataError(str(exc)) from exc
        initial = self.start_from()
        logger.info(
            "I-MedSAM training %s: %d train / %d val samples from %d final labels, starting from %s",
            settings["name"], len(split["train"]), len(split["val"]), len(datalist), initial or f"the {self.network_overrides.get('encoder')} start",
        )
        if sampler_overrides(split, self.modality_temperature, int(settings["seed"])):
            counts = Counter(split["modalities"].get(name) or UNKNOWN_MODALITY for name in split["train"])
            logger.info(
                "training samples by modality %s: drawn modality-balanced (temperature %g)", dict(counts), self.modality_temperature
            )
        best = os.path.join(run_dir, "models", "model.pt")
        if os.path.exists(best):
            os.remove(best)
        workflow = self.bundle_workflow(settings, run_dir, split, initial)
        if self.network_overrides.get("modality_prompt"):
            logger.info("the network's modality prompt is given each sample's modality (%r when it has none)", ANY_MODALITY)
        workflow.initialize()
        workflow.run()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        best_dice = float(evaluator.state.best_metric)
        workflow.finalize()
        if not os.path.isfile(best):
            raise RuntimeError(f"training finished without writing {best}")
        copy_atomically(best, self.publish_path)  # the infer task never reads half a file
        stats = {
            "name": settings["name"],
            "total_time": round(time.time() - start, 1),
            "epochs": int(settings["max_epochs"]),
            "best_val_dice": round(best_dice, 4),
            "train_samples": len(split["train"]),
            "val_samples": len(split["val"]),
            "final_labels": len(datalist),
            "started_from": initial,
            "published": self.publish_path,
            "published_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json_atomically(self.stats_path, stats)
        logger.info("I-MedSAM training %s done: best val Dice %.4f, published %s", settings["name"], best_dice, self.publish_path)
        return stats
