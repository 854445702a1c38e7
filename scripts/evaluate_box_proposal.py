#!/usr/bin/env python
"""How good are the boxes a model proposes for images nobody has prompted?

    python scripts/evaluate_box_proposal.py --checkpoint models/model.pt \
        --dataset_dir ../shared/data/kvasir_sessile --split_file ../shared/data/splits/kvasir_sessile_split.json \
        --cross_domain_dir ../shared/data/cvc_clinicdb_sample --output runs/box_proposal.md

For every image of the ``--split`` list (and every image of ``--cross_domain_dir``), at the image's own size
through :class:`imedsam.inference.Predictor`: the proposed box's IoU with the tight box of the ground truth,
and the Dice of the mask each of three boxes prompts: the proposed box, the tight box (what an annotator
draws) and the whole image (the rule before the head). Writes a Markdown table (``--output``) and a
per-image CSV beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

NETWORK_OPTIONS = ("lora_rank", "fa_mode")


def evaluate(predictor, datalist: list[dict]) -> list[dict]:
    from imedsam.cli import read_rgb_image
    from imedsam.data import box_from_mask, box_iou, read_mask
    from imedsam.metrics import dice

    rows = []
    for item in datalist:
        image, truth = read_rgb_image(item["image"]), read_mask(item["label"])
        predictor.set_image(image)
        proposed, confidence = predictor.propose_box()
        tight = box_from_mask(truth).tolist()
        height, width = truth.shape
        row = {"name": item["name"], "box_iou": box_iou(proposed, tight), "confidence": confidence,
               "proposed_box": [round(float(v), 1) for v in proposed], "tight_box": tight}  # fmt: skip
        for key, box in (("proposed", proposed), ("tight", tight), ("whole_image", [0, 0, width, height])):
            probability, _ = predictor.predict(box)
            row[f"dice_{key}"] = dice(probability > 0.5, truth)
        rows.append(row)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| data | images | box IoU mean | box IoU median | IoU ≥ 0.5 | Dice, proposed box | Dice, tight box | Dice, whole image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in results.items():
        iou = np.array([r["box_iou"] for r in rows])
        cells = [name, str(len(rows)), f"{iou.mean():.3f}", f"{np.median(iou):.3f}", f"{(iou >= 0.5).mean():.0%}"]
        cells += [f"{np.mean([r[k] for r in rows]):.4f}" for k in ("dice_proposed", "dice_tight", "dice_whole_image")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an I-MedSAM state dict trained with the box-proposal head")
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split_file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cross_domain_dir", help="a second dataset, all of its images")
    parser.add_argument("--encoder", default="lite_medsam")
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--fa_mode", default="amplitude")
    parser.add_argument("--output", default="runs/box_proposal.md")
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.dataset_dir, args.split_file, args.cross_domain_dir):
        if path and not os.path.exists(path):
            parser.exit(2, f"evaluate_box_proposal: error: not found: {path}\n")

    from imedsam.data import polyp_datalist
    from imedsam.inference import Predictor
    from imedsam.networks import build_imedsam

    model = build_imedsam(args.encoder, **{key: getattr(args, key) for key in NETWORK_OPTIONS}).load_checkpoint(args.checkpoint)
    if model.box_proposal is None or not model.box_proposal.is_trained:
        parser.exit(2, f"evaluate_box_proposal: error: {args.checkpoint} has no trained box-proposal head\n")
    predictor = Predictor(model)
    sets = {f"{os.path.basename(os.path.normpath(args.dataset_dir))} {args.split}": polyp_datalist(args.dataset_dir, args.split, args.split_file)}
    if args.cross_domain_dir:
        sets[f"{os.path.basename(os.path.normpath(args.cross_domain_dir))} all"] = polyp_datalist(args.cross_domain_dir, "all")
    started = time.perf_counter()
    results = {name: evaluate(predictor, datalist) for name, datalist in sets.items()}
    text = table(results)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.output)[0] + ".csv", "w", newline="") as f:
        fields = ["data", "name", "box_iou", "confidence", "dice_proposed", "dice_tight", "dice_whole_image", "proposed_box", "tight_box"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for name, rows in results.items():
            writer.writerows({"data": name, **row} for row in rows)
    print(f"{sum(map(len, results.values()))} images in {time.perf_counter() - started:.0f} s -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
