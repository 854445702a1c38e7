#!/usr/bin/env python
"""Per-modality Dice and Boundary IoU on the all-modality split (``bundle/datalists/modalities.json``).

    # a model: the untrained warm start (no --checkpoint), or a bundle run's models/model.pt
    python scripts/evaluate_modalities.py --row warm_start --output runs/modalities/warm_start.csv
    python scripts/evaluate_modalities.py --row all_three --checkpoint runs/all_three/models/model.pt \
        --modality-prompt --content-prompt --output runs/modalities/all_three.csv
    # a carried weight set, prompted by one click at each object's centre (grown in its plane: --click-rounds 3)
    python scripts/evaluate_modalities.py --row clicks --weights all_modalities_clicks --prompt click --output clicks.csv
    # the baselines: LiteMedSAM's reference forward and the ellipse inscribed in the box
    python scripts/evaluate_modalities.py --row reference --reference --output runs/modalities/reference.csv
    # the table of every row (mean and standard error per modality; the gain over a baseline row, paired)
    python scripts/evaluate_modalities.py --table runs/modalities/*.csv --baseline reference

Every item (one object in one 2D plane) is prompted with the tight box of its mask (``x1 = max + 1``), or with
``--prompt click`` one foreground click at its centre (:func:`imedsam.data.click_from_mask`), at the plane's own size through :class:`imedsam.inference.Predictor` (its defaults: adaptive decoding), with the item's
modality given to ``set_image``. Writes one CSV row per item and prints the per-modality means.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

FIELDS = ("row", "set", "modality", "case", "name", "object", "dice", "boundary_iou")


def _items(split: str, split_file: str | None, data_root: str | None, slice_step: int) -> list[dict]:
    from imedsam.data import modality_datalist

    return modality_datalist(split, split_file, data_root, slice_step=slice_step)


def _planes(items: list[dict]):
    """``(item, image H x W x 3 uint8, mask H x W bool)`` for each item, as the bundle's loader reads it."""
    from imedsam.transforms import LoadModalityItemd

    load = LoadModalityItemd()
    for item in items:
        loaded = load(item)
        image = np.asarray(loaded["image"]).transpose(1, 2, 0).clip(0, 255).round().astype(np.uint8)
        yield item, np.ascontiguousarray(image), np.asarray(loaded["label"])[0] > 0


def evaluate(segment, items: list[dict], row: str, prompt: str = "box") -> list[dict]:
    """``segment(image, prompt, modality) -> H x W bool`` on every item; one result row per item. ``prompt``:
    ``"box"`` gives the tight box ``[x0, y0, x1, y1]``, ``"click"`` the centre click ``[[x, y]]``
    (:func:`~imedsam.data.click_from_mask`)."""
    from imedsam.data import box_from_mask, click_from_mask
    from imedsam.metrics import boundary_iou, dice

    rows = []
    for item, image, mask in _planes(items):
        given = box_from_mask(mask).tolist() if prompt == "box" else [click_from_mask(mask).tolist()]
        predicted = segment(image, given, item["modality"])
        rows.append({
            "row": row, "set": item["set"], "modality": item["modality"], "case": item["case"], "name": item["name"],
            "object": item.get("object") or "", "dice": dice(predicted, mask), "boundary_iou": boundary_iou(predicted, mask),
        })  # fmt: skip
    return rows


def model_segmenter(args):
    from imedsam.inference import Predictor, PropagationRule, grow_click_mask
    from imedsam.networks import Prompts, build_imedsam

    if args.weights:
        model = build_imedsam(weights=args.weights)
    else:
        model = build_imedsam(
            modality_prompt=args.modality_prompt, content_prompt=args.content_prompt, decoder_lora_rank=args.decoder_lora_rank
        )
    if args.checkpoint:
        model.load_checkpoint(args.checkpoint)
    predictor = Predictor(model)

    def segment(image, given, modality):
        predictor.set_image(image, modality=modality if args.modality_prompt else None)
        if args.prompt == "box":
            return predictor.predict(given).probability > 0.5
        first = predictor.predict(Prompts(points=[[given]], point_labels=[[[1] * len(given)]]))
        grown, *_ = grow_click_mask(lambda box: tuple(predictor.predict(box)), first.probability[0], first.uncertainty[0],
                                    np.asarray(given), np.ones(len(given)), PropagationRule(click_rounds=args.click_rounds))  # fmt: skip
        return grown > 0.5

    return segment


def reference_segmenters():
    from imedsam.metrics import box_baseline_masks
    from imedsam.networks.encoders.lite_medsam import LiteMedSAMReference

    reference = LiteMedSAMReference()
    return {
        "lite_medsam_reference": lambda image, box, modality: reference(image, box) > 0,
        "ellipse_in_box": lambda image, box, modality: _ellipse(image.shape[:2], box, box_baseline_masks),
    }


def _ellipse(shape, box, box_baseline_masks):
    x0, y0, x1, y1 = (int(v) for v in box)
    target = np.zeros(shape, bool)
    target[y0:y1, x0:x1] = True  # a mask whose tight box is the box
    return box_baseline_masks(target)["ellipse_in_box"]


def write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend({**r, "dice": float(r["dice"]), "boundary_iou": float(r["boundary_iou"])} for r in csv.DictReader(f))
    return rows


def _mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, float)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def table(rows: list[dict], baseline: str | None) -> str:
    """A Markdown table: per row and modality, mean Dice ± standard error (and, against ``baseline``, the paired
    difference ± its standard error), and mean Boundary IoU."""
    by_row: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for r in rows:
        by_row[r["row"]][(r["modality"], r["set"], r["name"], r["object"])] = r
    modalities = sorted({r["modality"] for r in rows})
    lines = [
        "| row | " + " | ".join(f"{m} Dice | {m} BIoU" for m in modalities) + " |",
        "|---|" + "---|---|" * len(modalities),
    ]
    base = by_row.get(baseline, {}) if baseline else {}
    for name, items in by_row.items():
        cells = []
        for modality in modalities:
            keys = [k for k in items if k[0] == modality]
            if not keys:
                cells += ["", ""]
                continue
            mean, se = _mean_se([items[k]["dice"] for k in keys])
            cell = f"{mean:.4f} ± {se:.4f}"
            shared = [k for k in keys if k in base]
            if base and name != baseline and shared:
                gain, gain_se = _mean_se([items[k]["dice"] - base[k]["dice"] for k in shared])
                cell += f" ({gain:+.4f} ± {gain_se:.4f})"
            cells += [cell, f"{np.mean([items[k]['boundary_iou'] for k in keys]):.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{m} {sum(1 for k in next(iter(by_row.values())) if k[0] == m)}" for m in modalities)
    return "\n".join(lines) + f"\n\nItems per modality: {counts}."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", help="the row's name in the table")
    parser.add_argument("--output", help="the per-item CSV to write")
    parser.add_argument("--checkpoint", help="a trained I-MedSAM state dict; none: the untrained warm start")
    parser.add_argument("--weights", help="a weight set the package carries (e.g. all_modalities), instead of --checkpoint")
    parser.add_argument("--modality-prompt", action="store_true", help="the model has the modality prompt")
    parser.add_argument("--content-prompt", action="store_true", help="the model has the content prompt")
    parser.add_argument("--decoder-lora-rank", type=int, default=0, help="the model's LoRA rank in SAM's two-way transformer")
    parser.add_argument("--reference", action="store_true", help="score LiteMedSAM's reference forward and the ellipse instead")
    parser.add_argument("--prompt", default="box", choices=("box", "click"), help="the tight box, or one click at the object's centre")
    parser.add_argument("--click-rounds", type=int, default=0, help="with --prompt click: rounds of growing its mask (0: none, the CLI's default on pictures)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--split-file", help="default: bundle/datalists/modalities.json")
    parser.add_argument("--data-root", help="default: ../shared/data beside the project")
    parser.add_argument("--slice-step", type=int, default=2)
    parser.add_argument("--table", nargs="+", metavar="CSV", help="print the table of these CSVs and exit")
    parser.add_argument("--baseline", help="with --table: the row the gains are paired against")
    args = parser.parse_args(argv)
    if args.table:
        print(table(read_rows(args.table), args.baseline))
        return 0
    if not args.output or not (args.row or args.reference):
        parser.error("give --output and --row (or --reference), or --table")
    if args.weights and args.checkpoint:
        parser.error("give --weights or --checkpoint, not both")
    if args.reference and args.prompt != "box":
        parser.error("the reference rows (LiteMedSAM's forward, the ellipse) take the box only")
    items = _items(args.split, args.split_file, args.data_root, args.slice_step)
    start = time.perf_counter()
    if args.reference:
        rows = [row for name, segment in reference_segmenters().items() for row in evaluate(segment, items, name)]
    else:
        rows = evaluate(model_segmenter(args), items, args.row, args.prompt)
    write_rows(args.output, rows)
    print(table(rows, None))
    print(f"{len(items)} items in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
