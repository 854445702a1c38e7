#!/usr/bin/env python
"""Markdown tables of a volume evaluation (``bundle/configs/evaluate_volume.yaml``'s ``volumes.csv``): per set and
object kind, mean 3D DSC, NSD and the slices left empty at the object's ends, I-MedSAM beside LiteMedSAM's recipe.

    python scripts/volume_results_table.py bundle/eval/volumes/volumes.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict

import numpy as np

PROTOCOL_NAMES = {
    "box3d": "(a) 3D box",
    "slice_box": "(b) one 2D box, middle slice",
    "every_slice": "(c) tight box on every slice",
}


def object_kind(row: dict) -> str:
    """Named objects (a tumour's regions) are grouped by name; numbered ones (one per label value) together."""
    return "organs (every label value)" if row["object"].isdigit() else row["object"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv_file")
    parser.add_argument("--datalist", help="take each case's set from this datalist (for a CSV without a set column)")
    args = parser.parse_args()
    with open(args.csv_file) as handle:
        rows = list(csv.DictReader(handle))
    if args.datalist:
        with open(args.datalist) as handle:
            sets = {case["case"]: case.get("set", "") for case in json.load(handle)["cases"]}
        for row in rows:
            row["set"] = sets.get(row["case"], "")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row.get("set") or "all", object_kind(row))].append(row)
    for (name, kind), chosen in sorted(groups.items()):
        cases = len({r["case"] for r in chosen})
        objects = len({(r["case"], r["object"]) for r in chosen})
        print(f"\n**{name}, {kind}** ({cases} case(s), {objects} object(s))\n")
        print("| protocol | I-MedSAM DSC | NSD | empty end slices | LiteMedSAM recipe DSC | NSD | empty end slices |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for protocol, title in PROTOCOL_NAMES.items():
            cells = []
            for method in ("imedsam", "lite_medsam"):
                picked = [r for r in chosen if r["protocol"] == protocol and r["method"] == method]
                if not picked:
                    cells += ["", "", ""]
                    continue
                mean = {key: float(np.mean([float(r[key]) for r in picked])) for key in ("dsc", "nsd", "gap_low", "gap_high")}
                cells += [f"{mean['dsc']:.3f}", f"{mean['nsd']:.3f}", f"{mean['gap_low']:.1f} / {mean['gap_high']:.1f}"]
            print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
