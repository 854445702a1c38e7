"""All-modality 2D training data: the modality names, the split file ``bundle/datalists/modalities.json``, a
datalist of one object in one 2D plane per item, its loader transform and a modality-balanced sampler.

The split file names files relative to ``data_root`` (by default ``../shared/data`` beside the project) and never
holds data. Each set is split by case, patient, structure (a set of one volume) or region (a set of one image),
never by slice; each set's ``split_rule`` says how.

An item of :func:`modality_datalist` is one object in one 2D plane::

    {"image": abs path, "label": abs path, "modality": str, "set": str, "case": str, "name": unique str,
     "slice": int | None, "label_values": list[int] | None, "instance": int | None,
     "crop": [y0, y1, x0, x1] | None, "object": str}

``slice`` is the ``K`` index of a volume (axial planes along the array's third axis), ``label_values`` the label
values that make a volume's object, ``instance`` the id in an instance-id picture, ``crop`` the rows ``y0:y1`` and
columns ``x0:x1`` of the picture the item is cut to. ``None`` values and lists of varying length do not batch with
``default_collate``: drop those keys (or collate with a list collate) before a ``DataLoader`` batches items.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ..networks.prompts.modality import MODALITY_NAMES
from .arrays import cached_image_array
from .volume_datalist import read_volume_datalist

__all__ = [
    "MODALITIES",
    "DICOM_MODALITIES",
    "normalize_modality",
    "default_modality_split_file",
    "read_modality_split",
    "modality_datalist",
    "modality_sample_weights",
    "ModalityBalancedSampler",
]

#: the CVPR 2024 "Segment Anything in Medical Images on Laptop" challenge's modalities, lower case (the modality
#: prompt's tokens)
MODALITIES = MODALITY_NAMES

#: DICOM Modality codes (and common aliases), lower case, to the modality names. ``XC`` (external-camera
#: photography) is left out: it is not only dermoscopy.
DICOM_MODALITIES = {
    "mri": "mr",
    "pt": "pet",
    "cr": "xray",
    "dx": "xray",
    "rg": "xray",
    "xa": "xray",
    "x-ray": "xray",
    "mg": "mammography",
    "es": "endoscopy",
    "op": "fundus",
    "opt": "oct",
    "sm": "microscopy",
    "gm": "microscopy",
}

SPLITS = ("train", "val", "test")

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def normalize_modality(value) -> str | None:
    """The modality name (one of :data:`MODALITIES`) for a name or DICOM Modality code, any case.

    None, an empty or blank string give None (no modality known). Anything else is a ``ValueError`` that names
    the value and the accepted names.

    >>> normalize_modality("CT"), normalize_modality("MRI"), normalize_modality("PT"), normalize_modality("DX")
    ('ct', 'mr', 'pet', 'xray')
    >>> normalize_modality("Endoscopy"), normalize_modality("OPT"), normalize_modality(""), normalize_modality(None)
    ('endoscopy', 'oct', None, None)
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"modality must be a string, got {value!r} ({type(value).__name__}); accepted: {_accepted()}")
    key = value.strip().lower()
    if not key:
        return None
    if key in MODALITIES:
        return key
    if key in DICOM_MODALITIES:
        return DICOM_MODALITIES[key]
    raise ValueError(f"unknown modality {value!r}; accepted: {_accepted()}")


def _accepted() -> str:
    codes = ", ".join(f"{code.upper()}->{name}" for code, name in DICOM_MODALITIES.items())
    return f"{', '.join(MODALITIES)} (any case), or the DICOM codes CT, MR, US, {codes}"


# -- the split file --------------------------------------------------------------------------------------------


def default_modality_split_file() -> str:
    """``bundle/datalists/modalities.json`` of the project this package sits in."""
    return str(_PROJECT_ROOT / "bundle" / "datalists" / "modalities.json")


def _default_data_root() -> str:
    # the convention of bundle/datalists/shared_volumes.json (evaluate_volume.yaml's data_root): ../shared/data
    # beside the project
    return os.path.normpath(str(_PROJECT_ROOT / ".." / "shared" / "data"))


def read_modality_split(path: str | os.PathLike | None = None) -> dict:
    """The parsed split file (default :func:`default_modality_split_file`), checked.

    It holds ``sets`` (per set: ``modality``, ``kind`` picture/volume/instances, ``split_by``
    case/structure/region, ``split_rule``, ``splits`` and, for volumes, ``objects``: name -> label values) and
    ``cases`` (``case``, ``set``, ``modality``, ``image``, ``label``, the paths relative to the data root).
    A missing or corrupt file is an error that names it.
    """
    path = os.fspath(path) if path is not None else default_modality_split_file()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"modality split file not found: {path}")
    try:
        with open(path) as handle:
            table = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"modality split file {path} is not readable JSON: {exc}") from exc
    if not isinstance(table, dict) or not isinstance(table.get("sets"), dict) or not isinstance(table.get("cases"), list):
        raise ValueError(f"modality split file {path} must be a JSON object with 'sets' (an object) and 'cases' (a list)")
    for name, spec in table["sets"].items():
        try:
            modality = normalize_modality(spec.get("modality"))
            kind, split_by, splits = spec["kind"], spec["split_by"], spec["splits"]
        except (AttributeError, KeyError, ValueError) as exc:
            raise ValueError(f"modality split file {path}: set {name!r} is malformed ({type(exc).__name__}: {exc})") from exc
        if modality is None or kind not in ("picture", "volume", "instances") or split_by not in ("case", "structure", "region"):
            raise ValueError(f"modality split file {path}: set {name!r} needs a modality, a kind (picture, volume, "
                             f"instances) and a split_by (case, structure, region)")
        if not isinstance(splits, dict) or set(splits) - set(SPLITS):
            raise ValueError(f"modality split file {path}: set {name!r} splits must be an object with keys among {SPLITS}")
        if kind == "volume" and not isinstance(spec.get("objects"), dict):
            raise ValueError(f"modality split file {path}: volume set {name!r} needs 'objects' (name -> label values)")
    for case in table["cases"]:
        if not isinstance(case, dict) or case.get("set") not in table["sets"] or "case" not in case:
            raise ValueError(f"modality split file {path}: case {case!r} needs a 'case' and a 'set' that 'sets' defines")
    return table


def _modality_filter(values, what: str) -> set[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    names = {normalize_modality(v) for v in values}
    if None in names:
        raise ValueError(f"{what} must name modalities, got {values!r}")
    return names


def modality_datalist(
    split: str,
    split_file: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    slice_step: int = 2,
    min_pixels: int = 50,
    modalities: Sequence[str] | None = None,
    exclude_modalities: Sequence[str] | None = None,
) -> list[dict]:
    """The items of one split: one object in one 2D plane each (the keys are in the module's docstring).

    Args:
        split: ``train``, ``val`` or ``test``.
        split_file: the split JSON (default :func:`default_modality_split_file`).
        data_root: where the file's relative paths start (default ``../shared/data`` beside the project).
        slice_step: volumes give every ``slice_step``-th of an object's axial slices (along the array's third
            axis ``K``) that hold at least ``min_pixels`` of it.
        min_pixels: the least foreground of a volume object's slice, or of a nucleus, to make an item. Pictures
            (one polyp mask each) are not read here and always make an item.
        modalities: keep only these modalities (names or DICOM codes).
        exclude_modalities: leave these out.

    The list is deterministic: sets in the file's order, cases in the file's order, objects in the set's
    order, slices and instances ascending. Volumes and instance maps are read here (cached, see
    :class:`LoadModalityItemd`) to find the slices and instances.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(slice_step, bool) or not isinstance(slice_step, int) or slice_step < 1:
        raise ValueError(f"slice_step must be a positive integer, got {slice_step!r}")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 1:
        raise ValueError(f"min_pixels must be a positive integer, got {min_pixels!r}")
    keep, drop = _modality_filter(modalities, "modalities"), _modality_filter(exclude_modalities, "exclude_modalities") or set()
    path = os.fspath(split_file) if split_file is not None else default_modality_split_file()
    table = read_modality_split(path)
    root = os.path.abspath(os.fspath(data_root) if data_root is not None else _default_data_root())
    cases = read_volume_datalist(path, root)  # the cases with image and label joined to the data root

    items: list[dict] = []
    for set_name, spec in table["sets"].items():
        modality = normalize_modality(spec["modality"])
        if (keep is not None and modality not in keep) or modality in drop:
            continue
        chosen = spec["splits"].get(split, [])
        for case in (c for c in cases if c["set"] == set_name):
            if spec["split_by"] == "case" and case["case"] not in chosen:
                continue
            for key in ("image", "label"):
                if not os.path.isfile(case[key]):
                    raise FileNotFoundError(f"{set_name} case {case['case']}: {key} not found: {case[key]} (data_root {root})")
            base = {"image": case["image"], "label": case["label"], "modality": modality, "set": set_name, "case": str(case["case"])}
            if spec["kind"] == "picture":
                items.append(_item(base, f"{set_name}/{case['case']}", object="foreground"))
            elif spec["kind"] == "volume":
                objects = spec["objects"]
                names = list(objects) if spec["split_by"] == "case" else [n for n in objects if n in chosen]
                items.extend(_volume_items(base, objects, names, slice_step, min_pixels))
            else:
                items.extend(_instance_items(base, chosen, min_pixels))
    return items


def _item(base: dict, name: str, slice=None, label_values=None, instance=None, crop=None, object=None) -> dict:
    return {**base, "name": name, "slice": slice, "label_values": label_values, "instance": instance, "crop": crop, "object": object}


def _volume_items(base: dict, objects: Mapping, names: Sequence[str], slice_step: int, min_pixels: int) -> list[dict]:
    label = cached_image_array(base["label"], False)
    items = []
    for name in names:
        values = [int(v) for v in objects[name]]
        counts = np.isin(label, values).sum(axis=(0, 1))
        for k in np.flatnonzero(counts >= min_pixels)[::slice_step]:
            items.append(_item(base, f"{base['set']}/{base['case']}/{name}/k{int(k):03d}", slice=int(k), label_values=values, object=name))
    return items


def _instance_items(base: dict, crop, min_pixels: int) -> list[dict]:
    try:
        y0, y1, x0, x1 = (int(v) for v in crop)
    except (TypeError, ValueError):
        raise ValueError(f"{base['set']}: a region split must be a crop [y0, y1, x0, x1], got {crop!r}") from None
    ids = cached_image_array(base["label"], True)[0]  # H x W
    inside = np.zeros_like(ids, dtype=bool)
    inside[y0:y1, x0:x1] = True
    items = []
    for instance in (int(v) for v in np.unique(ids) if v != 0):
        mask = ids == instance
        if mask.sum() >= min_pixels and not (mask & ~inside).any():
            items.append(_item(base, f"{base['set']}/{base['case']}/instance{instance:03d}", instance=instance,
                               crop=[y0, y1, x0, x1], object=f"instance {instance}"))
    return items


# -- sampling --------------------------------------------------------------------------------------------------


def _modality_names(data) -> list[str]:
    names = [item["modality"] if isinstance(item, Mapping) else item for item in data]
    if not names:
        raise ValueError("cannot sample from an empty list of items")
    return [str(name) for name in names]


def _check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number in [0, 1], got {temperature!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"temperature must be in [0, 1] (0: each modality by its size, 1: modalities equally), got {temperature!r}")
    return value


def modality_sample_weights(modalities: Sequence[str], temperature: float) -> torch.Tensor:
    """One float64 weight per item (summing to 1): modality ``k`` with ``n_k`` items is drawn with probability
    proportional to ``n_k ** (1 - temperature)``, and uniformly within the modality.

    ``temperature`` 0 draws items uniformly (a modality by its size), 1 draws modalities uniformly.

    >>> modality_sample_weights(["ct", "ct", "ct", "mr"], temperature=1.0)
    tensor([0.1667, 0.1667, 0.1667, 0.5000], dtype=torch.float64)
    >>> modality_sample_weights(["ct", "ct", "ct", "mr"], temperature=0.0)
    tensor([0.2500, 0.2500, 0.2500, 0.2500], dtype=torch.float64)
    """
    names = _modality_names(modalities)
    temperature = _check_temperature(temperature)
    counts = Counter(names)
    mass = {name: n ** (1.0 - temperature) for name, n in counts.items()}
    total = sum(mass.values())
    return torch.tensor([mass[name] / total / counts[name] for name in names], dtype=torch.float64)


class ModalityBalancedSampler(WeightedRandomSampler):
    """Draw dataset indices so that modality ``k`` comes with probability proportional to ``n_k ** (1 - temperature)``
    (:func:`modality_sample_weights`), with replacement.

    Args:
        data: the datalist items (their ``modality``) or the modality names, one per dataset index.
        temperature: 0 keeps the data's proportions, 1 makes the modalities equally likely.
        num_samples: indices per epoch (default: the number of items).
        replacement: as :class:`~torch.utils.data.WeightedRandomSampler`.
        seed: seeds a generator of its own, so the draws are reproducible (unless ``generator`` is given).
        generator: a ``torch.Generator`` to draw with.

    ``probabilities`` maps each modality to its share of the draws.

    >>> sampler = ModalityBalancedSampler(["ct"] * 9 + ["mr"], temperature=1.0, num_samples=4, seed=0)
    >>> len(list(sampler)), sampler.probabilities
    (4, {'ct': 0.5, 'mr': 0.5})
    """

    def __init__(
        self,
        data: Sequence,
        temperature: float = 1.0,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.modalities = _modality_names(data)
        self.temperature = _check_temperature(temperature)
        weights = modality_sample_weights(self.modalities, self.temperature)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        super().__init__(weights, len(self.modalities) if num_samples is None else num_samples, replacement=replacement, generator=generator)
        shares: dict[str, float] = {}
        for name, weight in zip(self.modalities, weights.tolist()):
            shares[name] = shares.get(name, 0.0) + weight
        self.probabilities = {name: round(share, 12) for name, share in shares.items()}
