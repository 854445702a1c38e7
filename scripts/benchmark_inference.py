#!/usr/bin/env python
"""Inference benchmark of I-MedSAM: encoder, decoder (exact and adaptive, float32 and bfloat16) at several
output sizes, re-prompt with a cached encoding, memory, and achieved GFLOP/s against this machine's matmul.

    python scripts/benchmark_inference.py                      # vit_b at 384 on CPU, the default
    python scripts/benchmark_inference.py --encoder vit_tiny --repeats 3

Times are medians over --repeats runs after one warm-up run; the model is random-init (speed does not
depend on the weights). GFLOP/s is the FLOP count of a call (torch's FlopCounterMode: matmuls and
convolutions) over its time; "ratio" divides it by a 2048 x 2048 matmul in the same precision, measured in
this run. Peak RSS is the process's high-water mark (ru_maxrss). With glibc's default, freed decoder chunks
stay in the heap, so the mark overstates the working set; run with MALLOC_MMAP_THRESHOLD_=65536 to see the
working set itself.
"""

from __future__ import annotations

import argparse
import os
import resource

import numpy as np
import torch
from benchmark_common import count_gflop, matmul_gflops, median_seconds

from imedsam.inference import Predictor
from imedsam.networks import IMedSAM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vit_b")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--output-sizes", type=int, nargs="+", default=[128, 384, 896])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = IMedSAM(encoder=args.encoder, image_size=args.image_size).eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    size = args.image_size
    image = torch.rand(1, 3, size, size)
    box = torch.tensor([[[0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]]])
    rates = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}

    print(f"I-MedSAM inference benchmark: encoder={args.encoder} image_size={size} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} repeats={args.repeats} (medians)")
    print(f"parameters: trainable {trainable:,}  total {total:,}")
    print(f"2048^2 matmul: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f} GFLOP/s")
    print(f"{'':34s} {'seconds':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'ratio':>6s}")

    def report(name: str, fn, precision: str = "float32") -> float:
        seconds = median_seconds(fn, args.repeats)
        gflop = count_gflop(fn, inference=True)
        print(f"{name:34s} {seconds:8.3f} {gflop:7.1f} {gflop / seconds:8.1f} {gflop / seconds / rates[precision]:6.2f}")
        return seconds

    with torch.no_grad():
        encode = report("encoder", lambda: model.encode(image))
        encoding = model.encode(image)
        for precision in ("float32", "bfloat16"):
            model.decoder.precision = precision
            for mode in ("exact", "adaptive"):
                for out in args.output_sizes:
                    report(f"decode {mode:8s} {precision:8s} {out:4d}^2",
                           lambda: model.decode(encoding, box, (out, out), mode=mode), precision)
        model.decoder.precision = "float32"

    picture = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    predictor = Predictor(model)
    predictor.set_image(picture)
    boxes = iter(np.random.default_rng(1).uniform([0, 0, 0.5, 0.5], [0.4, 0.4, 1, 1], (10000, 4)) * size)
    for precision in ("float32", "bfloat16"):
        model.decoder.precision = precision
        for mode in ("exact", "adaptive"):
            model.decode_mode = mode
            for out in (size, 896):
                report(f"re-prompt {mode:8s} {precision:8s} {out:4d}^2",
                       lambda: predictor.predict(next(boxes), output_size=(out, out)), precision)
    assert predictor.encoder_calls == 1
    print(f"(re-prompt: cached encoding of a {size}x{size} image; exact decoding at {size}^2 plus the encoder: "
          f"see 'encoder' above, {encode:.3f} s)")
    allocator = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB (MALLOC_MMAP_THRESHOLD_={allocator})")


if __name__ == "__main__":
    main()
