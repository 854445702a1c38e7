#!/usr/bin/env python
"""Volume benchmark: per case, every object of the volume in one process, the whole process timed (start-up,
reading, model building, OpenVINO's conversion or its cache read, encoding, writing), for ``imedsam predict``
and for LiteMedSAM's CVPR 2024 recipe (``python -m imedsam.evaluation.lite_medsam_3d``: the encoder on every
slice of every object) in the same run, with each process's peak resident memory.

    python scripts/benchmark_volume.py [--datalist bundle/datalists/shared_volumes.json] [--cases A B]
        [--synthetic-ct 300] [--skip-recipe] [--checkpoint 2D.pt] [--volumetric V.pt [--slab-depth 5]]
        [--pad-to 240 240 155] [--warm-cache]

Both get the objects' 3D boxes from the ground truth (the CVPR 2024 prompt). ``--synthetic-ct N`` adds a
512 x 512 x N int16 CT with one object across a fifth of its slices, for the memory bound. Times are also given
as a ratio to the 2048^2 float32 matmul measured in the same run.

``--volumetric V.pt`` also times ``imedsam predict --checkpoint V.pt --volumetric-adapter`` (3DSAM-adapter's slabs)
on the same prompts, against the 2D model's process (``--checkpoint``, else the default weights): the "3D s"
columns and the ratio "3D / 2D". ``--pad-to I J K`` places each case in a zero volume of that size first (BraTS's
original 240 x 240 x 155 grid), for the memory bound. ``--warm-cache`` runs each ``imedsam predict`` once untimed
first, so that OpenVINO's conversion of new weights (once per set of weights, kept on disk) is not in the times.
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


def padded_case(case: dict, folder: str, grid) -> dict:
    """``case`` placed in the middle of a zero volume of ``grid`` (image and label alike, the affine kept)."""
    paths = {}
    for key in ("image", "label"):
        source = nib.load(case[key])
        array = np.asarray(source.dataobj)
        if any(s > g for s, g in zip(array.shape, grid)):
            raise SystemExit(f"{case['case']} is {array.shape}, larger than --pad-to {tuple(grid)}")
        start = [(g - s) // 2 for s, g in zip(array.shape, grid)]
        padded = np.zeros(tuple(grid), array.dtype)
        padded[tuple(slice(o, o + s) for o, s in zip(start, array.shape))] = array
        paths[key] = os.path.join(folder, f"{case['case']}_padded_{key}.nii.gz")
        nib.save(nib.Nifti1Image(padded, source.affine), paths[key])
    return {**case, **paths, "case": f"{case['case']} in {'x'.join(map(str, grid))}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default=os.path.join(ROOT, "bundle", "datalists", "shared_volumes.json"))
    parser.add_argument("--data-root", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--cases", nargs="*", help="case names (default: every case of the datalist)")
    parser.add_argument("--synthetic-ct", type=int, default=0, metavar="SLICES", help="add a 512 x 512 x SLICES CT")
    parser.add_argument("--skip-recipe", action="store_true", help="time imedsam only")
    parser.add_argument("--checkpoint", help="the 2D model's checkpoint (default: the default weights)")
    parser.add_argument("--volumetric", metavar="CHECKPOINT", help="also time a model with volumetric adapters")
    parser.add_argument("--slab-depth", type=int, default=5)
    parser.add_argument("--volumetric-blocks", default="all", choices=("all", "last_half"))
    parser.add_argument("--pad-to", type=int, nargs=3, metavar=("I", "J", "K"), help="pad each case into this grid")
    parser.add_argument("--warm-cache", action="store_true", help="run each imedsam process once untimed first")
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
        print(header + (f" {'3D s':>7s} {'MiB':>6s} {'3D / 2D':>7s}" if args.volumetric else ""))
        for case in cases:
            if args.pad_to:
                case = padded_case(case, folder, args.pad_to)
            label = np.asarray(nib.load(case["label"]).dataobj)
            boxes = [box3d_of(mask) for _, mask in volume_objects(label, case.get("objects"), 200)]
            box_args = sum((["--box3d", *[str(int(v)) for v in box]] for box in boxes), [])
            slices = sum(int(b[5] - b[2]) for b in boxes)
            modality = ["--modality", case["modality"]] if case.get("modality") else []
            predict = [sys.executable, "-m", "imedsam.cli", "predict", "--image", case["image"], *box_args, *modality,
                       "--output", os.path.join(folder, "ours.nii.gz")]  # fmt: skip
            plain = predict + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
            volumetric = predict + ["--checkpoint", args.volumetric, "--volumetric-adapter", "--slab-depth", str(args.slab_depth),
                                    "--volumetric-blocks", args.volumetric_blocks]  # fmt: skip
            if args.warm_cache:
                run_process(plain)
                if args.volumetric:
                    run_process(volumetric)
            ours = run_process(plain)
            recipe = (float("nan"), float("nan")) if args.skip_recipe else run_process(
                [sys.executable, "-m", "imedsam.evaluation.lite_medsam_3d", "--image", case["image"], *box_args, *modality,
                 "--output", os.path.join(folder, "recipe.nii.gz")])  # fmt: skip
            print(f"{case['case']:32s} {len(boxes):7d} {slices:6d} {ours[0]:9.1f} {ours[1]:6.0f} {recipe[0]:9.1f} "
                  f"{recipe[1]:6.0f} {ours[0] / recipe[0]:6.2f}", end="", flush=True)  # fmt: skip
            if args.volumetric:
                slabs = run_process(volumetric)
                print(f" {slabs[0]:7.1f} {slabs[1]:6.0f} {slabs[0] / ours[0]:7.2f}", end="")
            print(flush=True)
    print("slices: the objects' z-ranges added up; ratio: imedsam's time over the recipe's; MiB: peak RSS of the process")


if __name__ == "__main__":
    main()
