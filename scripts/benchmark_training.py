#!/usr/bin/env python
"""Training-step benchmark of I-MedSAM: time, peak memory and achieved GFLOP/s of one optimiser step.

    python scripts/benchmark_training.py              # the bundle's defaults: lite_medsam, label 256, 128^2 queries, batch 2,
                                                      # attention stages 0 and 1 checkpointed, then 0, then none
    python scripts/benchmark_training.py --encoder vit_b --image-size 384 --label-sizes 384 --batch-sizes 1 4 --query-sizes all

A step is what the bundle's trainer does: encode, decode every box with UGS at ``label_size`` x
``label_size`` query points (or, with a query size, on a random sub-lattice of that many rows and columns
of that grid, as the bundle's ``train_query_size`` does), the coarse + fine loss, backward, AdamW. SAM's
weights are frozen (lite_medsam's are the pretrained ones; the vit_* presets are random here: speed does not
depend on the weights). The last column estimates an epoch: its steps times the median step.
Each configuration runs in its own process so that its peak RSS is its own. Times are medians over
--repeats steps after one warm-up step. GFLOP/s is the step's FLOP count (torch's FlopCounterMode) over
its time, beside a 2048 x 2048 fp32 matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from benchmark_common import count_gflop, matmul_gflops


def run_one(args) -> dict:
    from imedsam.engine import PromptInferer, parameter_groups
    from imedsam.losses import CoarseFineLoss
    from imedsam.networks import build_imedsam

    torch.manual_seed(0)
    size, batch, label = args.image_size, args.batch_size, args.label_size
    stages = tuple(int(stage) for stage in args.checkpoint_stage_set.split(",") if stage)
    model = build_imedsam(args.encoder, image_size=size, freeze_sam=True, checkpoint_stages=stages,
                          encoder_precision=args.precision, decoder_precision=args.precision).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3), lr=1e-3)
    loss_fn = CoarseFineLoss()
    inferer = PromptInferer((label, label), return_all=True, query_size=args.query_size)
    images = torch.rand(batch, 3, size, size)
    boxes = torch.tensor([[0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]]).repeat(batch, 1).unsqueeze(1)
    target = torch.zeros(batch, 1, label, label)
    target[..., label // 4 : 3 * label // 4, label // 4 : 3 * label // 4] = 1

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = inferer(images, model, boxes=boxes)
        loss = loss_fn(out, target)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    gflop = count_gflop(step)
    seconds = statistics.median(times)
    return {
        "encoder": args.encoder,
        "image_size": size,
        "batch": batch,
        "label_size": label,
        "query_points": (args.query_size or label) ** 2,
        "step_s": seconds,
        "gflop": gflop,
        "gflops": gflop / seconds,
        "matmul_gflops": matmul_gflops(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "checkpoint_stages": list(stages),
        "precision": args.precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="lite_medsam")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--label-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--query-sizes", nargs="+", default=["128"],
                        help="rows and columns of the label grid decoded per step: 'all' (every pixel) or a number")
    parser.add_argument("--checkpoint-stages", nargs="+", default=None, metavar="STAGES",
                        help="sets of lite_medsam attention stages to recompute in the backward pass, e.g. '0' '' '0,1' "
                        "(default for lite_medsam: the bundle's [0, 1], then [0], then none)")  # fmt: skip
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="encoder_precision and decoder_precision (training uses the first for the frozen stem)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-images", type=int, default=118, help="images of an epoch, for its estimate (Kvasir-Sessile train: 118)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single configuration, as JSON
    parser.add_argument("--label-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--query-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-stage-set", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint_stages is None:
        args.checkpoint_stages = ["0,1", "0", ""] if args.encoder == "lite_medsam" else [""]
    if args.one:
        print(json.dumps(run_one(args)))
        return

    print(f"I-MedSAM training-step benchmark: encoder={args.encoder} image_size={args.image_size} "
          f"precision={args.precision} torch={torch.__version__} repeats={args.repeats} (medians; SAM frozen, LoRA + adapters + decoder train)")
    try:
        queries = [None if q == "all" else int(q) for q in args.query_sizes]
    except ValueError:
        parser.error(f"--query-sizes takes 'all' or numbers of rows and columns, got {args.query_sizes}")
    for query in queries:
        if query is not None and not 1 <= query <= min(args.label_sizes):
            parser.error(f"query size {query} must be between 1 and the smallest label grid, {min(args.label_sizes)}")
    print(f"{'checkpointed':>12s} "
          f"{'batch':>5s} {'label grid':>10s} {'queries':>9s} {'step s':>8s} {'s/image':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
          f"{'matmul GFLOP/s':>15s} {'ratio':>6s} {'peak RSS MiB':>13s} {'epoch min':>10s}")
    for stages, label, query, batch in itertools.product(args.checkpoint_stages, args.label_sizes, queries, args.batch_sizes):
        command = [sys.executable, __file__, "--one", "--encoder", args.encoder, "--image-size", str(args.image_size),
                   "--label-size", str(label), "--batch-size", str(batch), "--repeats", str(args.repeats),
                   "--checkpoint-stage-set", stages, "--precision", args.precision]  # fmt: skip
        if query is not None:
            command += ["--query-size", str(query)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{'stages ' + stages if stages else 'none':>12s} "
              f"{batch:5d} {label:>6d}^2   {result['query_points']:9d} {result['step_s']:8.2f} {result['step_s'] / batch:8.2f} "
              f"{result['gflop']:8.0f} {result['gflops']:8.1f} {result['matmul_gflops']:15.1f} "
              f"{result['gflops'] / result['matmul_gflops']:6.2f} {result['peak_rss_mib']:13.0f} "
              f"{math.ceil(args.epoch_images / batch) * result['step_s'] / 60:10.1f}")
    print(f"epoch min: steps of one epoch over {args.epoch_images} images times the median step (no validation, no data loading); "
          "checkpointed: the lite_medsam attention stages whose activations are recomputed in the backward pass")  # fmt: skip

if __name__ == "__main__":
    main()
