#!/usr/bin/env python
"""Scores of the prompts themselves, no model: the tight ground-truth box filled, and the ellipse inscribed
in it, at a label size, on one split of a dataset folder. A box-prompted model has to beat these.

    python scripts/box_baselines.py --dataset_dir ../shared/data/kvasir_sessile \
        --split_file ../shared/data/splits/kvasir_sessile_split.json --split test --label_size 384
"""

from __future__ import annotations

import argparse
import json

from imedsam.data import polyp_datalist
from imedsam.metrics import score_box_baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split_file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--label_size", type=int, default=384)
    args = parser.parse_args()
    summary = score_box_baselines(polyp_datalist(args.dataset_dir, args.split, args.split_file), args.label_size)
    print(json.dumps({"dataset_dir": args.dataset_dir, "split": args.split, "label_size": args.label_size, **summary}, indent=2))


if __name__ == "__main__":
    main()
