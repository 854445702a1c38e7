"""Convert a published polyp dataset (Kvasir-SEG, Kvasir-Sessile, CVC-ClinicDB) to the project's layout.

The output is the folder every datalist here reads: ``images/`` (RGB or grey pictures), ``masks/`` (8-bit
PNG, 0 or 255, same stem as the image), ``split.json`` (train/val/test file names) and ``prepare.json``
(what was read, the threshold, the split rule and any pair that was left out, with the reason).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .datalist import SPLITS, images_by_stem
from .pictures import IMAGE_EXTENSIONS, read_picture
from .splits import seeded_split
from .staging import staged_dataset_folder

__all__ = ["SOURCE_LAYOUTS", "find_source_folders", "read_sequence_table", "sequence_split", "prepare_polyp_dataset"]

logger = logging.getLogger(__name__)

# (picture folder, mask folder) as the datasets publish them: Kvasir-SEG / Kvasir-Sessile / PraNet copies use
# images/ + masks/; CVC-ClinicDB's official release uses Original/ + Ground Truth/ (under PNG/ or TIF/).
SOURCE_LAYOUTS = (("images", "masks"), ("Original", "Ground Truth"), ("Original", "GroundTruth"))
# Written as they come (the bytes are kept); anything else (TIFF, BMP) is re-encoded losslessly as PNG.
KEPT_EXTENSIONS = (".png", ".jpg", ".jpeg")


def find_source_folders(source: str) -> tuple[str, str]:
    """``(image folder, mask folder)`` of a dataset in ``source`` or in one of its direct sub-folders."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"source dataset folder not found: {source}")
    candidates = [source] + sorted(
        os.path.join(source, name) for name in os.listdir(source) if os.path.isdir(os.path.join(source, name))
    )
    found = []
    for folder in candidates:
        for image_name, mask_name in SOURCE_LAYOUTS:
            images, masks = os.path.join(folder, image_name), os.path.join(folder, mask_name)
            if os.path.isdir(images) and os.path.isdir(masks):
                found.append((images, masks))
    if not found:
        layouts = ", ".join(f"{i}/ + {m}/" for i, m in SOURCE_LAYOUTS)
        raise FileNotFoundError(f"{source} holds no polyp dataset: expected one of {layouts} in it or a sub-folder")
    if len(found) > 1:
        listed = "; ".join(f"{i} + {m}" for i, m in found)
        raise ValueError(f"{source} holds {len(found)} datasets ({listed}); pass the folder of the one to prepare")
    return found[0]


def _mask_array(mask: Image.Image, path: str) -> np.ndarray:
    if mask.mode in ("RGB", "RGBA"):
        channels = np.asarray(mask.convert("RGB"))
        if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
            raise ValueError(f"mask {path} is a colour image; a polyp mask is one grey channel (or three equal ones)")
        return channels[..., 0]
    if mask.mode in ("L", "1", "P"):
        return np.asarray(mask.convert("L"))
    if mask.mode in ("I", "I;16", "F"):
        return np.asarray(mask)
    raise ValueError(f"mask {path} has image mode {mask.mode}; expected a grey mask")


def _looks_swapped(image: Image.Image, mask: Image.Image) -> bool:
    # the public CVC-ClinicDB copy has its folders swapped: grey two-level "pictures" beside colour "masks"
    if mask.mode != "RGB" or image.mode not in ("L", "1", "P"):
        return False
    values = np.unique(np.asarray(image.convert("L")))
    colour = np.asarray(mask)
    return values.size <= 16 and not np.array_equal(colour[..., 0], colour[..., 1])


def read_sequence_table(path: str) -> dict[str, str]:
    """Frame stem → sequence id from a CSV with a header of ``frame,sequence`` or ``first,last,sequence``.

    A ``first,last`` row covers the numbered frames ``first`` … ``last`` (CVC-ClinicDB's frames are ``1`` …
    ``612``); ``scripts/data/cvc_clinicdb_sequences.csv`` is the table of its 29 sequences.
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"could not read sequence table {path}: {exc}") from exc
    if not rows:
        raise ValueError(f"sequence table {path} has no rows")
    columns = set(rows[0])
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        if {"frame", "sequence"} <= columns:
            frames = [row["frame"].strip()]
        elif {"first", "last", "sequence"} <= columns:
            try:
                first, last = int(row["first"]), int(row["last"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path} line {number}: first and last must be frame numbers, got {row}") from exc
            if last < first:
                raise ValueError(f"{path} line {number}: last frame {last} comes before first frame {first}")
            frames = [str(frame) for frame in range(first, last + 1)]
        else:
            raise ValueError(f"sequence table {path} needs the columns frame,sequence or first,last,sequence; it has {sorted(columns)}")
        for frame in frames:
            if frame in table:
                raise ValueError(f"{path} gives frame {frame} two sequences ({table[frame]}, {row['sequence']})")
            table[frame] = row["sequence"].strip()
    return table


def sequence_split(stems: Sequence[str], sequences: dict[str, str], seed: int, fractions: tuple[float, float]) -> dict[str, list[str]]:
    """Split whole sequences, so that near-identical frames of one video never sit in two splits."""
    missing = [stem for stem in stems if stem not in sequences]
    if missing:
        raise ValueError(f"the sequence table has no sequence for {len(missing)} frames, e.g. {missing[:3]}")
    groups: dict[str, list[str]] = {}
    for stem in sorted(stems):
        groups.setdefault(sequences[stem], []).append(stem)
    if len(groups) < 3:
        raise ValueError(f"a split by sequence needs at least 3 sequences, the frames belong to {len(groups)}")
    by_group = seeded_split(sorted(groups), seed, fractions)
    return {split: sorted(stem for group in by_group[split] for stem in groups[group]) for split in SPLITS}


def _given_split(path: str, stems: Sequence[str]) -> dict[str, list[str]]:
    with open(path) as f:
        table = json.load(f)
    missing_keys = [split for split in SPLITS if split not in table]
    if missing_keys:
        raise ValueError(f"split file {path} has no {missing_keys} list")
    split = {key: [os.path.splitext(name)[0] for name in table[key]] for key in SPLITS}
    unknown = sorted(set(sum(split.values(), [])) - set(stems))
    if unknown:
        raise ValueError(f"split file {path} names {len(unknown)} images that the dataset does not have, e.g. {unknown[:3]}")
    return split


def prepare_polyp_dataset(
    source: str,
    output: str,
    split_file: str | None = None,
    sequence_table: str | None = None,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    threshold: int = 127,
    swapped: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write ``output`` from the dataset in ``source``; returns the ``prepare.json`` record.

    Args:
        source: a dataset folder in one of :data:`SOURCE_LAYOUTS`, or a folder with one of them inside.
        output: the folder to write; it must not exist unless ``overwrite``. It appears only when complete.
        split_file: a JSON ``{"train": [...], "val": [...], "test": [...]}`` of file names or stems to keep.
        sequence_table: a CSV (see :func:`read_sequence_table`) to split by video sequence.
        seed, fractions: the seeded split (train and val fractions, the rest test) of images or sequences.
        threshold: mask pixels ``> threshold`` are foreground (JPEG masks are noisy around 0 and 255).
        swapped: the picture folder holds the masks and vice versa (the public CVC-ClinicDB copy).
    """
    if split_file and sequence_table:
        raise ValueError("give a split_file or a sequence_table, not both")
    image_dir, mask_dir = find_source_folders(source)
    if swapped:
        image_dir, mask_dir = mask_dir, image_dir
    images, masks = images_by_stem(image_dir), images_by_stem(mask_dir)
    if not images and not masks:
        raise ValueError(f"{image_dir} and {mask_dir} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        raise ValueError(
            f"{len(unpaired)} files have no partner between {image_dir} and {mask_dir}, e.g. {unpaired[:3]}; "
            "every picture needs a mask with the same name"
        )

    written, empty = {}, []
    with staged_dataset_folder(output, overwrite) as partial:
        for stem in sorted(images):
            image, mask = read_picture(images[stem]), read_picture(masks[stem], "mask")
            if not swapped and _looks_swapped(image, mask):
                raise ValueError(
                    f"{images[stem]} is a two-level grey image and {masks[stem]} a colour picture: the folders "
                    "look swapped (as in the public CVC-ClinicDB copy); pass swapped=True (--swapped)"
                )
            if image.size != mask.size:
                raise ValueError(f"{images[stem]} is {image.size[0]}x{image.size[1]} but its mask {masks[stem]} is {mask.size[0]}x{mask.size[1]}")
            foreground = _mask_array(mask, masks[stem]) > threshold
            if not foreground.any():
                empty.append(stem)
                continue
            ext = os.path.splitext(images[stem])[1].lower()
            if ext in KEPT_EXTENSIONS and image.mode in ("RGB", "L"):
                name = stem + ext
                shutil.copyfile(images[stem], os.path.join(partial, "images", name))
            else:
                name = stem + ".png"
                picture = image if image.mode in ("RGB", "L") else image.convert("RGB")
                picture.save(os.path.join(partial, "images", name))
            Image.fromarray(foreground.astype(np.uint8) * 255).save(os.path.join(partial, "masks", stem + ".png"))
            written[stem] = name
        if empty:
            logger.warning("%d masks have no foreground above %d and are left out: %s", len(empty), threshold, empty[:5])
        if len(written) < 3:
            raise ValueError(f"only {len(written)} usable image/mask pairs in {source}; a train/val/test split needs 3")

        stems = sorted(written)
        if split_file:
            split, rule = _given_split(split_file, stems), f"given: {split_file}"
            dropped = sorted(set(stems) - set(sum(split.values(), [])))
            if dropped:
                logger.warning("%d prepared images are in no split of %s, e.g. %s", len(dropped), split_file, dropped[:3])
            split = {key: [stem for stem in names if stem in written] for key, names in split.items()}
        elif sequence_table:
            split = sequence_split(stems, read_sequence_table(sequence_table), seed, fractions)
            rule = f"by sequence from {sequence_table}, seed {seed}, fractions {list(fractions)} of the sequences"
        else:
            split, rule = seeded_split(stems, seed, fractions), f"random by image, seed {seed}, fractions {list(fractions)}"
        split_names = {key: [written[stem] for stem in split[key]] for key in SPLITS}
        with open(os.path.join(partial, "split.json"), "w") as f:
            json.dump({**split_names, "note": f"written by prepare_polyp; split {rule}"}, f, indent=1)
        record = {
            "source": os.path.abspath(source),
            "images": image_dir,
            "masks": mask_dir,
            "swapped": swapped,
            "threshold": threshold,
            "pairs": len(written),
            "left_out_empty_masks": empty,
            "split": rule,
            "counts": {key: len(split_names[key]) for key in SPLITS},
        }
        with open(os.path.join(partial, "prepare.json"), "w") as f:
            json.dump(record, f, indent=1)
    logger.info("prepared %d pairs in %s (%s)", len(written), output, record["counts"])
    return record

