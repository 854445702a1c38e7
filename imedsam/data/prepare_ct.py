"""Cut abdominal CT volumes (BCV/Synapse, AMOS) into windowed 2D axial slices with per-organ label maps.

The output is the project's dataset layout with one addition, ``labels.json``: ``images/CASE_zNNN.png``
(8-bit grey, the HU window mapped to 0..255), ``masks/CASE_zNNN.png`` (8-bit label map: organ values as in
the source, 0 elsewhere), ``labels.json`` (value → organ name), ``split.json`` (split by case, so that slices
of one patient never sit in two splits) and ``prepare.json`` (what was read and what was left out).
With ``labels.json`` present, :func:`imedsam.data.polyp_datalist` gives one item, one box and one binary mask
per organ present in a slice, so a multi-organ dataset trains and evaluates through the bundle unchanged.

Slices are shown in the radiological view: patient's anterior at the top, patient's right on the left.
"""

from __future__ import annotations

import json
import logging
import os
import re

import nibabel as nib
import numpy as np
from PIL import Image

from .intensity import intensity_window
from .datalist import SPLITS, label_names_from_table
from .splits import seeded_split
from .staging import staged_dataset_folder

__all__ = ["ABDOMEN_WINDOW", "LABEL_MAPS", "NIFTI_EXTENSIONS", "find_volume_pairs", "read_label_map", "window_hu", "prepare_ct_slices"]

logger = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ABDOMEN_WINDOW = (40.0, 400.0)  # (level, width) in HU: -160..240

_ORGANS_COMMON = ("spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta")
LABEL_MAPS = {
    # BCV / Synapse multi-organ (MICCAI 2015 "Beyond the Cranial Vault"), 13 organs
    "bcv": dict(enumerate(
        _ORGANS_COMMON + ("inferior vena cava", "portal and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"),
        start=1,
    )),
    # AMOS 2022, 15 organs
    "amos": dict(enumerate(
        _ORGANS_COMMON + ("postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder", "prostate/uterus"),
        start=1,
    )),
}


def _case_name(filename: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if filename.endswith(ext):
            return filename[: -len(ext)]
    return None


def _volumes(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"volume folder not found: {folder}")
    found = {}
    for filename in sorted(os.listdir(folder)):
        case = _case_name(filename)
        if case is not None and not filename.startswith("."):
            found[case] = os.path.join(folder, filename)
    return found


def _number(case: str) -> str | None:
    digits = re.findall(r"\d+", case)
    return str(int(digits[-1])) if digits else None


def find_volume_pairs(image_dir: str, label_dir: str) -> dict[str, tuple[str, str]]:
    """Case → (image path, label path). Files pair by name (AMOS: ``amos_0001.nii.gz`` in both folders) or,
    when the names differ, by their last number (BCV: ``img0001.nii.gz`` and ``label0001.nii.gz``)."""
    images, labels = _volumes(image_dir), _volumes(label_dir)
    if not images:
        raise ValueError(f"no NIfTI volumes ({', '.join(NIFTI_EXTENSIONS)}) in {image_dir}")
    if set(images) == set(labels):
        return {case: (images[case], labels[case]) for case in images}
    by_number: dict[str, dict[str, str]] = {"image": {}, "label": {}}
    for kind, volumes in (("image", images), ("label", labels)):
        for case, path in volumes.items():
            number = _number(case)
            if number is None or number in by_number[kind]:
                raise ValueError(
                    f"cannot pair the volumes of {image_dir} and {label_dir}: their names differ and {path} has no "
                    "number of its own to pair by"
                )
            by_number[kind][number] = path
    unpaired = sorted(set(by_number["image"]) ^ set(by_number["label"]), key=int)
    if unpaired:
        raise ValueError(f"{len(unpaired)} case numbers have an image or a label volume but not both, e.g. {unpaired[:3]}")
    return {
        _case_name(os.path.basename(by_number["image"][n])): (by_number["image"][n], by_number["label"][n])
        for n in sorted(by_number["image"], key=int)
    }


def read_label_map(spec: str | dict) -> dict[int, str]:
    """Label value → organ name from a preset (``"bcv"``, ``"amos"``), a JSON file or a dict."""
    if isinstance(spec, dict):
        table = spec
    elif spec in LABEL_MAPS:
        return dict(LABEL_MAPS[spec])
    else:
        try:
            with open(spec) as f:
                table = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"label map {spec!r} is neither a preset {sorted(LABEL_MAPS)} nor a readable JSON file: {exc}") from exc
    label_map = label_names_from_table(table, f"label map {spec if isinstance(spec, str) else table!r}")
    if max(label_map) > 255:
        raise ValueError(f"label values must be 1..255 (0 is background), got {sorted(label_map)}")
    return label_map


def _objects_by_name(organs: dict[int, str]) -> dict[str, list[int]]:
    """Organ name → its label values; values that share a name make one object (e.g. a tumour's sub-regions)."""
    grouped: dict[str, list[int]] = {}
    for value, name in sorted(organs.items()):
        grouped.setdefault(name, []).append(value)
    return grouped


def window_hu(plane: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU values → uint8: ``level - width/2`` and below is 0, ``level + width/2`` and above is 255."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2
    return np.clip(np.round((plane.astype(np.float64) - low) / width * 255), 0, 255).astype(np.uint8)


def _radiological(plane: np.ndarray) -> np.ndarray:
    # a RAS+ axial plane is indexed [x (to the patient's right), y (to anterior)]: rows from anterior down,
    # columns from the patient's right
    return np.ascontiguousarray(plane.T[::-1, ::-1])


def _load(path: str) -> nib.Nifti1Image:
    try:
        volume = nib.as_closest_canonical(nib.load(path))
        volume.get_fdata(dtype=np.float32)  # read now, so a truncated file fails here with its name
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, EOFError, zlib errors)
        raise ValueError(f"could not read NIfTI volume {path}: {exc}") from exc
    if volume.ndim != 3:
        raise ValueError(f"{path} has shape {volume.shape}; expected a 3D volume")
    return volume


def prepare_ct_slices(
    image_dir: str,
    label_dir: str,
    output: str,
    label_map: str | dict = "bcv",
    window: tuple[float, float] = ABDOMEN_WINDOW,
    min_pixels: int = 64,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    overwrite: bool = False,
    modality: str = "ct",
) -> dict:
    """Write ``output`` from the CT volumes in ``image_dir`` and their label volumes in ``label_dir``.

    Intensities follow LiteMedSAM's conventions: a CT is windowed (``window``, by default level 40 / width
    400 HU) and mapped to 0..255; with ``modality="mr"`` each volume is clipped to the 0.5 and 99.5
    percentiles of its non-zero voxels and mapped to 0..255. The 8-bit slices are repeated to RGB when read.

    Args:
        label_map: ``"bcv"`` (13 organs), ``"amos"`` (15), a JSON file or dict of value → name. Values not in
            it are background (``{"6": "liver"}`` keeps the liver only); values that share a name are one
            object, written with the smallest of them (``{"1": "tumour", "2": "tumour", "4": "tumour"}``).
        window: (level, width) in HU; the default is the abdomen window 40/400. Unused for MR.
        modality: ``"ct"`` or ``"mr"``.
        min_pixels: an organ with fewer pixels in a slice is background there (slivers at an organ's ends
            give no usable box); a slice left with no organ is skipped.
        seed, fractions: the seeded split of cases (train and val fractions, the rest test).

    Returns the ``prepare.json`` record.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    organs = read_label_map(label_map)
    objects = _objects_by_name(organs)
    pairs = find_volume_pairs(image_dir, label_dir)
    if len(pairs) < 3:
        raise ValueError(f"a split by case needs at least 3 cases, {image_dir} has {len(pairs)}")
    slices: dict[str, list[str]] = {}
    boxes_per_organ = {name: 0 for name in organs.values()}
    with staged_dataset_folder(output, overwrite) as partial:
        for case, (image_path, label_path) in pairs.items():
            image, label = _load(image_path), _load(label_path)
            if image.shape != label.shape:
                raise ValueError(f"{image_path} has shape {image.shape} but its label {label_path} has {label.shape}")
            if not np.allclose(image.affine, label.affine, atol=1e-3):
                raise ValueError(f"{image_path} and {label_path} have different affines: they do not cover the same space")
            values = label.get_fdata(dtype=np.float32)  # already read (and cached) by _load
            if not np.array_equal(values, np.round(values)) or values.min() < 0:
                raise ValueError(f"{label_path} is not a label volume: it holds negative or non-integer values")
            values = values.astype(np.int64)
            hu = image.get_fdata(dtype=np.float32)
            if modality == "mr":
                low, high = intensity_window(hu)
                case_window = ((low + high) / 2, high - low)
            else:
                case_window = window
            slices[case] = []
            for z in range(values.shape[2]):
                plane = values[:, :, z]
                kept = np.zeros(plane.shape, np.uint8)
                for name, object_values in objects.items():
                    organ = np.isin(plane, object_values)
                    if organ.sum() >= min_pixels:
                        kept[organ] = object_values[0]
                        boxes_per_organ[name] += 1
                if not kept.any():
                    continue
                name = f"{case}_z{z:03d}.png"
                Image.fromarray(_radiological(window_hu(hu[:, :, z], *case_window))).save(os.path.join(partial, "images", name))
                Image.fromarray(_radiological(kept)).save(os.path.join(partial, "masks", name))
                slices[case].append(name)
            if not slices[case]:
                logger.warning("%s has no slice with an organ of the label map of at least %d pixels", case, min_pixels)
        written = sum(len(names) for names in slices.values())
        if not written:
            raise ValueError(f"no slice of any volume holds an organ of the label map {organs} with at least {min_pixels} pixels")
        by_case = seeded_split(sorted(slices), seed, fractions)
        split = {key: [name for case in by_case[key] for name in slices[case]] for key in SPLITS}
        with open(os.path.join(partial, "split.json"), "w") as f:
            json.dump({**split, "note": f"written by prepare_ct_slices; split by case, seed {seed}, fractions {list(fractions)}",
                       "cases": by_case}, f, indent=1)
        with open(os.path.join(partial, "labels.json"), "w") as f:
            json.dump({str(values[0]): name for name, values in objects.items()}, f, indent=1)
        record = {
            "images": os.path.abspath(image_dir),
            "labels": os.path.abspath(label_dir),
            "modality": modality,
            "window": {"level": window[0], "width": window[1]} if modality == "ct" else "0.5-99.5 percentiles of non-zero voxels",
            "min_pixels": min_pixels,
            "cases": len(slices),
            "slices": written,
            "boxes_per_organ": boxes_per_organ,
            "cases_without_organs": sorted(case for case, names in slices.items() if not names),
            "counts": {key: len(split[key]) for key in SPLITS},
        }
        with open(os.path.join(partial, "prepare.json"), "w") as f:
            json.dump(record, f, indent=1)
    logger.info("prepared %d slices of %d cases in %s (%s)", written, len(slices), output, record["counts"])
    return record
