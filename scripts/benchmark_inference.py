#!/usr/bin/env python
"""Inference benchmark of I-MedSAM: encoder, decoder at several output sizes, re-prompt, memory, parameters.

    python scripts/benchmark_inference.py                      # vit_b at 384 on CPU, the default
    python scripts/benchmark_inference.py --encoder vit_tiny --repeats 3

Times are medians over --repeats runs after one warm-up run; the model is random-init (speed does not
depend on the weights). Peak RSS is the process's high-water mark (ru_maxrss). With glibc's default,
freed decoder chunks stay in the heap and the mark overstates the working set by about 2 GB at 896x896;
run with MALLOC_MMAP_THRESHOLD_=65536 to see the working set itself.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np
import torch

from imedsam.inference import Predictor
from imedsam.networks import IMedSAM


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vit_b")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--output-sizes", type=int, nargs="+", default=[128, 384, 896])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = IMedSAM(encoder=args.encoder, image_size=args.image_size).eval().to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    size = args.image_size
    image = torch.rand(1, 3, size, size, device=device)
    box = torch.tensor([[[0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]]], device=device)

    print(f"I-MedSAM inference benchmark: encoder={args.encoder} image_size={size} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} (medians)")
    print(f"parameters: trainable {trainable:,}  total {total:,}")
    with torch.no_grad():
        encode = median_seconds(lambda: model.encode(image), args.repeats)
        print(f"encoder                          {encode:8.3f} s")
        encoding = model.encode(image)
        for out in args.output_sizes:
            decode = median_seconds(lambda: model.decode(encoding, box, (out, out)), args.repeats)
            print(f"decode, output {out:4d}x{out:<4d}          {decode:8.3f} s   (encoder + decode {encode + decode:.3f} s)")

    picture = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    predictor = Predictor(model)
    predictor.set_image(picture)
    boxes = iter(np.random.default_rng(1).uniform([0, 0, 0.5, 0.5], [0.4, 0.4, 1, 1], (1000, 4)) * size)
    reprompt = median_seconds(lambda: predictor.predict(next(boxes)), args.repeats)
    assert predictor.encoder_calls == 1
    print(f"re-prompt, cached encoding, {size}x{size} {reprompt:8.3f} s   (encoder ran once for all prompts)")
    allocator = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(f"peak RSS                         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB"
          f"   (MALLOC_MMAP_THRESHOLD_={allocator})")


if __name__ == "__main__":
    main()
