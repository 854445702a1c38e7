#!/usr/bin/env python
"""Large images: peak memory and time of ``imedsam predict`` on a big picture, and what the capped decode
size (``--max-decode-side``, the label app's ``max_decode_side``) and the adaptive decode mode cost in Dice on
real images.

    python scripts/benchmark_large_images.py                          # 4000 x 4000, then Kvasir-Sessile test
    python scripts/benchmark_large_images.py --checkpoint runs/main/models/model.pt --caps 0 512 256
    python scripts/benchmark_large_images.py --side 0 --caps 0 --modes exact adaptive   # Dice part only
    python scripts/benchmark_large_images.py --side 0 --caps 0 --modes adaptive --engines torch openvino
    python scripts/benchmark_large_images.py --side 0 --caps 0 --modes adaptive --adaptive_points 8192 4096

Part 1 runs the CLI in a child process on a ``--side`` x ``--side`` picture (a real image resized up) and
prints its wall time and peak RSS (the child's ru_maxrss). Part 2 segments every image of the test split
with its tight ground-truth box, with each encoder engine of ``--engines``, in each decode mode of ``--modes``,
at each cap in ``--caps`` (0: every pixel) upsampled to the image's size and, adaptive, with each
``--adaptive_points``, and prints the mean Dice against the full-resolution mask, the largest per-image
difference from the first setting, and the median decode time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from benchmark_common import cpu_summary, matmul_gflops
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def large_image_run(image_path: str, side: int, max_decode_side: int, checkpoint: str | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        big = os.path.join(folder, "big.png")
        Image.open(image_path).convert("RGB").resize((side, side), Image.BILINEAR).save(big)
        box = [str(round(side * f)) for f in (0.3, 0.3, 0.7, 0.7)]
        command = [sys.executable, "-m", "imedsam.cli", "predict", "--image", big, "--box", *box,
                   "--output", os.path.join(folder, "mask.png"), "--max-decode-side", str(max_decode_side)]  # fmt: skip
        if checkpoint:
            command += ["--checkpoint", checkpoint]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"imedsam predict failed:\n{result.stderr[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(f"{side} x {side} picture, imedsam predict --max-decode-side {max_decode_side}: {seconds:.1f} s, peak RSS {peak:.2f} GiB")


def capped_dice(
    dataset_dir: str,
    split_file: str,
    caps: list[int],
    modes: list[str],
    checkpoint: str | None,
    limit: int | None,
    engines: list[str],
    precision: str,
    adaptive_points: list[int] | None = None,
    adaptive_coarse_size: int | None = None,
) -> None:
    import torch

    from imedsam.data import box_from_mask, polyp_datalist, read_mask
    from imedsam.inference import Predictor
    from imedsam.metrics import binary_metrics
    from imedsam.networks import build_imedsam

    model = build_imedsam()
    if checkpoint:
        model.load_checkpoint(checkpoint)
    model.encoder_precision = model.decoder.precision = precision
    if adaptive_coarse_size:
        model.decoder.adaptive_coarse_size = adaptive_coarse_size
    items = polyp_datalist(dataset_dir, "test", split_file)[:limit]
    predictors = {engine: Predictor(model, encoder_engine=engine) for engine in engines}
    points = adaptive_points or [model.decoder.adaptive_points]
    settings = [(engine, mode, cap, n) for engine in engines for mode in modes for cap in caps
                for n in (points if mode == "adaptive" else [None])]  # fmt: skip
    dice = {setting: [] for setting in settings}
    seconds = {setting: [] for setting in settings}
    with torch.no_grad():
        for item in items:
            image = np.asarray(Image.open(item["image"]).convert("RGB"))
            target = read_mask(item["label"])
            box = box_from_mask(target)
            for engine, predictor in predictors.items():
                predictor.set_image(image)  # once per engine: its settings decode the same encoding
                for setting in (setting for setting in settings if setting[0] == engine):
                    _, predictor.decode_mode, cap, n = setting
                    model.decoder.adaptive_points = n or model.decoder.adaptive_points
                    predictor.max_decode_side = cap or None
                    start = time.perf_counter()
                    probability, _ = predictor.predict(box)
                    seconds[setting].append(time.perf_counter() - start)
                    dice[setting].append(binary_metrics(probability > 0.5, target)["dice"])
    name = os.path.basename(os.path.normpath(dataset_dir))
    print(f"{name} test split, {len(items)} images ({checkpoint or 'pretrained lite_medsam'}), tight boxes, precision "
          f"{precision!r}, adaptive decoding from a grid of at most {model.decoder.adaptive_coarse_size}; Dice at full "
          "resolution:")  # fmt: skip
    first = np.asarray(dice[settings[0]])
    for setting in settings:
        engine, mode, cap, n = setting
        largest = np.abs(np.asarray(dice[setting]) - first).max()
        adaptive = f", {n:>5} points at the output level" if mode == "adaptive" else ""
        print(f"  {engine:>8} encoder, {mode:>8}{adaptive}, max decode side {cap or 'none':>5}: Dice {np.mean(dice[setting]):.5f} "
              f"(largest per-image difference from the first row {largest:.4f}), decode {np.median(seconds[setting]):.3f} s (median)")  # fmt: skip
    print(json.dumps({"/".join(map(str, setting)): {"dice": float(np.mean(dice[setting])), "decode_s": float(np.median(seconds[setting]))}
                      for setting in settings}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = os.path.join(ROOT, "..", "shared", "data")
    parser.add_argument("--dataset_dir", default=os.path.join(shared, "kvasir_sessile"))
    parser.add_argument("--split_file", default=os.path.join(shared, "splits", "kvasir_sessile_split.json"))
    parser.add_argument("--checkpoint", default=None, help="a trained I-MedSAM (default: the pretrained lite_medsam start)")
    parser.add_argument("--side", type=int, default=4000, help="side of the CLI run's picture; 0 skips that run")
    parser.add_argument("--max_decode_side", type=int, default=1024)
    parser.add_argument("--caps", type=int, nargs="+", default=[0, 512, 384, 256, 128])
    parser.add_argument("--modes", nargs="+", default=["exact"], choices=["exact", "adaptive"], help="decode modes to compare")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--engines", nargs="+", default=["auto"], choices=["auto", "torch", "openvino"], help="encoder engines to compare")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="encoder and decoder precision")
    parser.add_argument("--adaptive_points", type=int, nargs="+", default=None,
                        help="the decoder's adaptive_points (points at the output's level) to compare (default: the model's)")
    parser.add_argument("--adaptive_coarse_size", type=int, default=None, help="the decoder's adaptive_coarse_size (default: the model's)")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}; 2048^2 float32 matmul {matmul_gflops():.0f} GFLOP/s in this run")
    if args.side:
        first = sorted(os.listdir(os.path.join(args.dataset_dir, "images")))[0]
        large_image_run(os.path.join(args.dataset_dir, "images", first), args.side, args.max_decode_side, args.checkpoint)
    capped_dice(args.dataset_dir, args.split_file, args.caps, args.modes, args.checkpoint, args.limit, args.engines, args.precision,
                args.adaptive_points, args.adaptive_coarse_size)


if __name__ == "__main__":
    main()
