#!/usr/bin/env python
"""Scores of the prompts themselves, no model: the tight ground-truth box filled, and the ellipse inscribed
in it, at a label size, on one split of a dataset folder. A box-prompted model has to beat these.

    python scripts/box_baselines.py --dataset_dir ../shared/data/kvasir_sessile \
        --split_file ../shared/data/splits/kvasir_sessile_split.json --split test --label_size 384
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from imedsam.data import box_from_mask, polyp_datalist, read_mask
from imedsam.metrics import METRIC_NAMES, binary_metrics


def resized_mask(path: str, size: int) -> np.ndarray:
    # the bundle's evaluation: bilinear resize of the 0/1 mask, threshold 0.5
    mask = read_mask(path).astype(np.float32)
    resized = Image.fromarray(mask).resize((size, size), Image.BILINEAR)
    return np.asarray(resized) >= 0.5


def box_prompts(mask: np.ndarray) -> dict[str, np.ndarray]:
    x0, y0, x1, y1 = box_from_mask(mask)
    filled = np.zeros_like(mask)
    filled[int(y0) : int(y1), int(x0) : int(x1)] = True
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return {"box_filled": filled, "ellipse_in_box": ellipse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split_file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--label_size", type=int, default=384)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"box_filled": [], "ellipse_in_box": []}
    for item in polyp_datalist(args.dataset_dir, args.split, args.split_file):
        target = resized_mask(item["label"], args.label_size)
        for name, prediction in box_prompts(target).items():
            rows[name].append(binary_metrics(prediction, target))
    summary = {
        name: {metric: float(np.mean([r[metric] for r in values])) for metric in METRIC_NAMES} | {"count": len(values)}
        for name, values in rows.items()
    }
    print(json.dumps({"dataset_dir": args.dataset_dir, "split": args.split, "label_size": args.label_size, **summary}, indent=2))


if __name__ == "__main__":
    main()
