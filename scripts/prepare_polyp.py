#!/usr/bin/env python
"""Prepare Kvasir-SEG, Kvasir-Sessile or CVC-ClinicDB for the bundle: images/, masks/ (0/255 PNG), split.json.

    # Kvasir-Sessile (images/ + masks/, JPEG), keeping the project's split
    python scripts/prepare_polyp.py ../shared/data/kvasir_sessile data/kvasir_sessile \
        --split-file ../shared/data/splits/kvasir_sessile_split.json
    # CVC-ClinicDB (PNG/Original + PNG/Ground Truth, or TIF/...), split by video sequence
    python scripts/prepare_polyp.py CVC-ClinicDB/PNG data/cvc --sequence-table scripts/data/cvc_clinicdb_sequences.csv
    # the public copy with the folders swapped (images/ holds the masks)
    python scripts/prepare_polyp.py Colo-Retal-Induscon2023/datasets/CVC-ClinicDB data/cvc --swapped

Then train with ``--dataset_dir data/kvasir_sessile`` (split.json is found in the folder).
"""

from __future__ import annotations

import argparse
import json
import logging

from imedsam.data.prepare_polyp import prepare_polyp_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the dataset as published (images/+masks/ or Original/+Ground Truth/)")
    parser.add_argument("output", help="the folder to write")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--split-file", help="keep this train/val/test JSON split")
    split.add_argument("--sequence-table", help="CSV frame,sequence or first,last,sequence: split by sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", type=float, nargs=2, default=(0.6, 0.2), metavar=("TRAIN", "VAL"))
    parser.add_argument("--threshold", type=int, default=127, help="mask pixels above it are foreground")
    parser.add_argument("--swapped", action="store_true", help="the picture and mask folders are swapped")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        record = prepare_polyp_dataset(
            args.source, args.output, split_file=args.split_file, sequence_table=args.sequence_table,
            seed=args.seed, fractions=tuple(args.fractions), threshold=args.threshold, swapped=args.swapped,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as exc:
        parser.exit(2, f"prepare_polyp: error: {exc}\n")
    print(json.dumps({key: record[key] for key in ("pairs", "counts", "split", "left_out_empty_masks")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
