"""Datalists of image/mask folders: ``images/`` + ``masks/`` with matching names, optional ``split.json``."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

from .boxes import box_from_mask
from .pictures import IMAGE_EXTENSIONS, check_picture, is_picture, read_picture
from .splits import seeded_split
from .synthetic import write_synthetic_dataset

__all__ = ["SPLITS", "polyp_datalist", "image_datalist", "images_by_stem", "label_names_from_table", "read_label_names", "read_mask"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def images_by_stem(folder: str) -> dict[str, str]:
    """Stem → path of the image files in ``folder`` (hidden files skipped); two files with one stem are an error."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if not is_picture(name) or name.startswith("."):
            continue
        if stem in found:
            raise ValueError(f"{folder} holds two files named {stem!r} ({os.path.basename(found[stem])}, {name})")
        found[stem] = os.path.join(folder, name)
    return found


def read_mask(path: str, threshold: int = 127) -> np.ndarray:
    """Read a mask file as a boolean ``H x W`` array (``> threshold``); an error names an unreadable file."""
    image = read_picture(path, "mask")
    return np.asarray(image.convert("L") if image.mode not in ("L", "1", "I", "I;16") else image) > threshold


def _read_label_values(path: str) -> np.ndarray:
    image = read_picture(path, "label map")
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"label map {path} has image mode {image.mode}; expected one channel of organ values")
    return np.unique(np.asarray(image))


def label_names_from_table(table, source: str) -> dict[int, str]:
    """Label value → organ name from a parsed JSON object; ``source`` names it in errors."""
    try:
        names = {int(value): str(name) for value, name in table.items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{source} must be a JSON object of label values to organ names, e.g. {{\"6\": \"liver\"}}: {exc}") from exc
    if not names or min(names) < 1:
        raise ValueError(f"{source} must name label values from 1 up (0 is background), got {sorted(names)}")
    return names


def read_label_names(path: str) -> dict[int, str]:
    """The ``labels.json`` of a multi-organ dataset folder: label value → organ name."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} must be a JSON object of label values to organ names, e.g. {{\"6\": \"liver\"}}: {exc}") from exc
    return label_names_from_table(table, path)


def polyp_datalist(
    dataset_dir: str,
    split: str = "train",
    split_file: str | None = None,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    generate_if_missing: bool = False,
    check_files: bool = True,
) -> list[dict]:
    """``[{"image": path, "label": path, "name": stem}, ...]`` for one split of a dataset folder.

    A folder with a ``labels.json`` (value → organ name, as ``scripts/prepare_ct_slices.py`` writes) holds
    label maps: each pair gives one item per organ present, ``{"image", "label", "name": "STEM_ORGAN",
    "label_value": value, "class": organ}``, and :class:`imedsam.transforms.BinarizeMaskd` keeps that organ.

    Args:
        dataset_dir: a folder with ``images/`` and ``masks/``; image and mask share a file name (the extension
            may differ, e.g. ``.jpg`` image with ``.png`` mask).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        split_file: JSON ``{"train": [names], "val": [...], "test": [...]}`` (file names or stems); defaults
            to ``dataset_dir/split.json``; without one, a split seeded by ``seed`` with ``fractions`` for
            train and val (the rest is test).
        generate_if_missing: write the synthetic demo dataset when ``dataset_dir`` does not exist.
        check_files: open every pair: an unreadable file is an error, an empty mask a logged skip.
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    if not os.path.isdir(dataset_dir):
        if not generate_if_missing:
            raise FileNotFoundError(f"dataset folder not found: {dataset_dir}")
        logger.warning("dataset folder %s is missing: writing the synthetic demo dataset there", dataset_dir)
        write_synthetic_dataset(dataset_dir)
    image_dir, mask_dir = os.path.join(dataset_dir, "images"), os.path.join(dataset_dir, "masks")
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{dataset_dir} must contain images/ and masks/ (matching file names); {folder} is missing")
    images, masks = images_by_stem(image_dir), images_by_stem(mask_dir)
    paired = sorted(set(images) & set(masks))
    if not paired:
        raise ValueError(
            f"no image/mask pairs in {dataset_dir}: images/ has {len(images)} images, masks/ has {len(masks)}, "
            "and none share a file name"
        )
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        logger.warning("%s: %d files without a partner are skipped, e.g. %s", dataset_dir, len(unpaired), unpaired[:3])

    if split == "all":
        chosen = paired
    else:
        if split_file is None and os.path.isfile(os.path.join(dataset_dir, "split.json")):
            split_file = os.path.join(dataset_dir, "split.json")
        if split_file is not None:
            with open(split_file) as f:
                table = json.load(f)
            if split not in table:
                raise ValueError(f"split file {split_file} has no {split!r} list (it has {sorted(table)})")
            chosen = [os.path.splitext(name)[0] for name in table[split]]
            missing = [name for name in chosen if name not in paired]
            if missing:
                raise ValueError(f"split file {split_file} names {len(missing)} {split} images not paired in {dataset_dir}, e.g. {missing[:3]}")
        else:
            chosen = seeded_split(paired, seed, fractions)[split]
    labels_file = os.path.join(dataset_dir, "labels.json")
    organs = read_label_names(labels_file) if os.path.isfile(labels_file) else None
    datalist = []
    for stem in chosen:
        if organs is not None:
            if check_files:
                check_picture(images[stem])
            present = [int(value) for value in _read_label_values(masks[stem]) if int(value) in organs]
            if not present:
                logger.warning("skipping %s: its label map %s holds no organ of %s", images[stem], masks[stem], labels_file)
            for value in present:
                organ = organs[value]
                datalist.append({
                    "image": images[stem], "label": masks[stem], "name": f"{stem}_{re.sub(r'[^0-9A-Za-z]+', '_', organ)}",
                    "label_value": value, "class": organ,
                })
            continue
        if check_files:
            check_picture(images[stem])
            if not read_mask(masks[stem]).any():
                logger.warning("skipping %s: its mask %s is empty", images[stem], masks[stem])
                continue
        datalist.append({"image": images[stem], "label": masks[stem], "name": stem})
    if not datalist:
        raise ValueError(f"the {split!r} split of {dataset_dir} has no usable image/mask pair")
    logger.info("%s split of %s: %d image/mask pairs", split, dataset_dir, len(datalist))
    return datalist


def image_datalist(image_dir: str, boxes_file: str | None = None, masks_dir: str | None = None) -> list[dict]:
    """``[{"image": path, "box": [[x0, y0, x1, y1]], "name": stem}, ...]`` for inference.

    Boxes come from ``boxes_file`` (JSON ``{name or stem: [x0, y0, x1, y1] or [[...], ...]}``) or from the
    masks in ``masks_dir`` (tight box of the foreground). Images without a box are an error.
    """
    if (boxes_file is None) == (masks_dir is None):
        raise ValueError("give exactly one source of boxes: boxes_file (JSON) or masks_dir")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    images = images_by_stem(image_dir)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    if boxes_file is not None:
        with open(boxes_file) as f:
            table = {os.path.splitext(k)[0]: v for k, v in json.load(f).items()}
        boxes = {}
        for stem in images:
            if stem not in table:
                raise ValueError(f"{boxes_file} has no box for image {stem!r}")
            box = np.asarray(table[stem], dtype=np.float32).reshape(-1, 4)
            boxes[stem] = box.tolist()
    else:
        masks = images_by_stem(masks_dir)
        missing = sorted(set(images) - set(masks))
        if missing:
            raise ValueError(f"{masks_dir} has no mask for {len(missing)} images, e.g. {missing[:3]}")
        boxes = {stem: [box_from_mask(read_mask(masks[stem])).tolist()] for stem in images}
    return [{"image": images[stem], "box": boxes[stem], "name": stem} for stem in images]
