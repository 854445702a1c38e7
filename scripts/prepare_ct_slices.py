#!/usr/bin/env python
"""Abdominal CT volumes (NIfTI) to windowed 2D axial slices with one box and mask per organ, for the bundle.

    # BCV / Synapse: img/img0001.nii.gz + label/label0001.nii.gz, 13 organs, abdomen window 40/400
    python scripts/prepare_ct_slices.py RawData/Training/img RawData/Training/label data/bcv --label-map bcv
    # AMOS MR (--modality mr: each volume's 0.5-99.5 percentiles of non-zero voxels to 0..255)
    python scripts/prepare_ct_slices.py amos22/imagesTr_mr amos22/labelsTr_mr data/amos_mr --label-map amos --modality mr
    # AMOS, liver only (cross-domain test), a soft-tissue window
    echo '{"6": "liver"}' > liver.json
    python scripts/prepare_ct_slices.py amos22/imagesTr amos22/labelsTr data/amos_liver --label-map liver.json \
        --window 50 350

Then train and evaluate with ``--dataset_dir data/bcv``: the folder's labels.json makes every organ present
in a slice one item (its own box and binary mask); evaluate.yaml reports Dice per organ in summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging

from imedsam.data.prepare_ct import ABDOMEN_WINDOW, LABEL_MAPS, prepare_ct_slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of CT volumes (.nii.gz / .nii)")
    parser.add_argument("labels", help="folder of label volumes, paired by name or by case number")
    parser.add_argument("output", help="the folder to write")
    parser.add_argument("--label-map", default="bcv", help=f"a preset ({', '.join(LABEL_MAPS)}) or a JSON file value -> organ")
    parser.add_argument("--window", type=float, nargs=2, default=ABDOMEN_WINDOW, metavar=("LEVEL", "WIDTH"), help="HU window")
    parser.add_argument(
        "--modality", default="ct", choices=("ct", "mr"),
        help="ct: the HU window; mr: each volume's 0.5-99.5 percentiles of non-zero voxels (LiteMedSAM's conventions)",
    )
    parser.add_argument("--min-pixels", type=int, default=64, help="smaller organ cross-sections are background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", type=float, nargs=2, default=(0.6, 0.2), metavar=("TRAIN", "VAL"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        record = prepare_ct_slices(
            args.images, args.labels, args.output, label_map=args.label_map, window=tuple(args.window),
            min_pixels=args.min_pixels, seed=args.seed, fractions=tuple(args.fractions), overwrite=args.overwrite,
            modality=args.modality,
        )
    except (OSError, ValueError) as exc:
        parser.exit(2, f"prepare_ct_slices: error: {exc}\n")
    print(json.dumps({key: record[key] for key in ("cases", "slices", "counts", "boxes_per_organ")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
