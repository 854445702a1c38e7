#!/usr/bin/env python
"""LiteMedSAM's reference forward, untrained, on one split of a dataset folder: the row every I-MedSAM result
is read against. Tight ground-truth boxes; masks scored at each image's own size, and at the bundle's label
sizes (the longest side to the size, as the bundle evaluates).

    python scripts/lite_medsam_reference.py --dataset_dir ../shared/data/kvasir_sessile \
        --split_file ../shared/data/splits/kvasir_sessile_split.json --split test --label_sizes 256 384 896

LiteMedSAM's training data includes Kvasir-SEG (and so Kvasir-Sessile): its scores there are not zero-shot.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image

from imedsam.data import box_from_mask, polyp_datalist, read_mask
from imedsam.metrics import binary_metrics, summarize_metrics
from imedsam.metrics.baselines import datalist_target, frame_mask
from imedsam.networks.lite_medsam import LiteMedSAMReference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split_file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--label_sizes", type=int, nargs="*", default=[256, 384, 896])
    parser.add_argument("--output", help="write the summary JSON here too")
    args = parser.parse_args(argv)

    reference = LiteMedSAMReference()
    rows: dict[str, list[dict]] = {"native": [], **{str(size): [] for size in args.label_sizes}}
    seconds = []
    for item in polyp_datalist(args.dataset_dir, args.split, args.split_file):
        image = np.asarray(Image.open(item["image"]).convert("RGB"))
        target = read_mask(item["label"])
        started = time.perf_counter()
        logits = reference(image, box_from_mask(target).tolist())
        seconds.append(time.perf_counter() - started)
        rows["native"].append(binary_metrics(logits > 0, target))
        for size in args.label_sizes:
            rows[str(size)].append(binary_metrics(frame_mask(logits > 0, size), datalist_target(item, size)))
    summary = {
        "dataset_dir": args.dataset_dir,
        "split": args.split,
        "count": len(seconds),
        "forward_seconds_median": round(float(np.median(seconds)), 3),
        **{name: summarize_metrics(values) for name, values in rows.items()},
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
