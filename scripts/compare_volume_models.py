#!/usr/bin/env python
"""One markdown table from several volume evaluations (``bundle/configs/evaluate_volume.yaml``'s ``volumes.csv``,
one per model): per model, 3D DSC and NSD of every case and protocol, their means, the mean seconds per object, and
the mean DSC difference from a baseline model over the same (case, object, protocol) rows.

    python scripts/compare_volume_models.py --baseline "2D" "2D=/tmp/a/volumes.csv" "adapter D=5=/tmp/b/volumes.csv"
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import numpy as np

PROTOCOLS = {"box3d": "(a)", "slice_box": "(b)", "every_slice": "(c)"}


def read_rows(path: str) -> dict[tuple, dict]:
    """I-MedSAM's rows of a ``volumes.csv`` keyed by (case, object, protocol)."""
    with open(path) as handle:
        return {(r["case"], r["object"], r["protocol"]): r for r in csv.DictReader(handle) if r["method"] == "imedsam"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=CSV")
    parser.add_argument("--baseline", help="the model NAME the differences are taken from (default: the first)")
    args = parser.parse_args()
    models = dict(item.rsplit("=", 1) for item in args.models)
    tables = {name: read_rows(path) for name, path in models.items()}
    baseline = args.baseline or next(iter(models))
    if baseline not in tables:
        raise SystemExit(f"--baseline {baseline!r} is not one of {list(tables)}")
    keys = sorted(set.intersection(*(set(t) for t in tables.values())), key=lambda k: (k[2], k[0], k[1]))
    if not keys:
        raise SystemExit("the evaluations share no (case, object, protocol) row")
    columns = [f"{k[0].replace('brats_2013_', '')} {PROTOCOLS.get(k[2], k[2])}" for k in keys]
    print("| model | " + " | ".join(f"{c} DSC / NSD" for c in columns) + " | mean DSC | mean NSD | s per object | DSC vs " + baseline + " |")
    print("| --- " * (len(columns) + 5) + "|")
    for name, table in tables.items():
        dsc = np.array([float(table[k]["dsc"]) for k in keys])
        nsd = np.array([float(table[k]["nsd"]) for k in keys])
        seconds = np.mean([float(table[k]["seconds"]) for k in keys])
        base = np.array([float(tables[baseline][k]["dsc"]) for k in keys])
        difference = dsc - base
        spread = difference.std(ddof=1) / np.sqrt(len(keys)) if len(keys) > 1 else float("nan")
        cells = " | ".join(f"{d:.3f} / {n:.3f}" for d, n in zip(dsc, nsd))
        versus = "—" if name == baseline else f"{difference.mean():+.3f} (SE {spread:.3f})"
        print(f"| {name} | {cells} | {dsc.mean():.3f} | {nsd.mean():.3f} | {seconds:.1f} | {versus} |")
    by_protocol = defaultdict(list)
    for k in keys:
        by_protocol[k[2]].append(k)
    print(f"\n{len(keys)} rows: {', '.join(f'{PROTOCOLS.get(p, p)} {len(v)}' for p, v in by_protocol.items())}")


if __name__ == "__main__":
    main()
