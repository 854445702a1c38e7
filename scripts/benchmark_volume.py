#!/usr/bin/env python
"""Volume benchmark: per case, every object of the volume in one process, the whole process timed (start-up,
reading, model building, OpenVINO's conversion or its cache read, encoding, writing), for ``imedsam predict``
and for LiteMedSAM's CVPR 2024 recipe (``python -m imedsam.evaluation.lite_medsam_3d``: the encoder on every
slice of every object) in the same run, with each process's peak resident memory.

    python scripts/benchmark_volume.py [--datalist bundle/datalists/shared_volumes.json] [--cases A B]
        [--synthetic-ct 300] [--skip-recipe]

Both get the objects' 3D boxes from the ground truth (the CVPR 2024 prompt). ``--synthetic-ct N`` adds a
512 x 512 x N int16 CT with one object across a fifth of its slices, for the memory bound. Times are also given
as a ratio to the 2048^2 float32 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import torch
from benchmark_common import cpu_summary, matmul_gflops

from imedsam.evaluation import box3d_of, read_volume_datalist
from imedsam.evaluation.volumes import volume_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process; its output goes to this script's stderr on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    output = process.stdout.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(output)
        raise SystemExit(f"{command[:4]} failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024


def synthetic_ct(folder: str, slices: int) -> dict:
    """A 512 x 512 x ``slices`` int16 CT: body, a liver-like ellipsoid across a fifth of the slices."""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    body = ((i - 256) / 220) ** 2 + ((j - 256) / 170) ** 2 <= 1
    volume = np.full((512, 512, slices), -1000, np.int16)
    label = np.zeros(volume.shape, np.uint8)
    first, count = slices * 2 // 5, max(slices // 5, 3)
    for n, k in enumerate(range(first, first + count)):
        plane = np.where(body, 40, -1000) + rng.normal(0, 15, (512, 512))
        radius = 1 - ((n - count / 2) / (count / 2 + 1)) ** 2
        organ = ((i - 200) / (90 * radius)) ** 2 + ((j - 230) / (70 * radius)) ** 2 <= 1
        plane[organ] += 60
        volume[:, :, k] = plane.astype(np.int16)
        label[:, :, k] = organ
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    paths = {key: os.path.join(folder, f"synthetic_ct_{key}.nii.gz") for key in ("image", "label")}
    nib.save(nib.Nifti1Image(volume, affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return {"case": f"synthetic_ct_512x512x{slices}", "modality": "ct", **paths, "objects": {"organ": [1]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default=os.path.join(ROOT, "bundle", "datalists", "shared_volumes.json"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--cases", nargs="*", help="case names (default: every case of the datalist)")
    parser.add_argument("--synthetic-ct", type=int, default=0, metavar="SLICES", help="add a 512 x 512 x SLICES CT")
    parser.add_argument("--skip-recipe", action="store_true", help="time imedsam only")
    args = parser.parse_args()

    fp32 = matmul_gflops(torch.float32)
    matmul_seconds = 2 * 2048**3 / fp32 / 1e9
    print(f"CPU: {cpu_summary()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"2048^2 matmul float32: {fp32:.0f} GFLOP/s ({matmul_seconds:.3f} s)")
    cases = [c for c in read_volume_datalist(args.datalist, args.data_root) if not args.cases or c["case"] in args.cases]
    with tempfile.TemporaryDirectory() as folder:
        if args.synthetic_ct:
            cases.append(synthetic_ct(folder, args.synthetic_ct))
        header = f"{'case':32s} {'objects':>7s} {'slices':>6s} {'imedsam s':>9s} {'MiB':>6s} {'recipe s':>9s} {'MiB':>6s} {'ratio':>6s}"
        print(header)
        for case in cases:
            label = np.asarray(nib.load(case["label"]).dataobj)
            boxes = [box3d_of(mask) for _, mask in volume_objects(label, case.get("objects"), 200)]
            box_args = sum((["--box3d", *[str(int(v)) for v in box]] for box in boxes), [])
            slices = sum(int(b[5] - b[2]) for b in boxes)
            modality = ["--modality", case["modality"]] if case.get("modality") else []
            ours = run_process([sys.executable, "-m", "imedsam.cli", "predict", "--image", case["image"], *box_args, *modality,
                                "--output", os.path.join(folder, "ours.nii.gz")])  # fmt: skip
            recipe = (float("nan"), float("nan")) if args.skip_recipe else run_process(
                [sys.executable, "-m", "imedsam.evaluation.lite_medsam_3d", "--image", case["image"], *box_args, *modality,
                 "--output", os.path.join(folder, "recipe.nii.gz")])  # fmt: skip
            print(f"{case['case']:32s} {len(boxes):7d} {slices:6d} {ours[0]:9.1f} {ours[1]:6.0f} {recipe[0]:9.1f} "
                  f"{recipe[1]:6.0f} {ours[0] / recipe[0]:6.2f}", flush=True)  # fmt: skip
    print("slices: the objects' z-ranges added up; ratio: imedsam's time over the recipe's; MiB: peak RSS of the process")


if __name__ == "__main__":
    main()
