#!/usr/bin/env python
"""Inference benchmark of I-MedSAM on this CPU, read against LiteMedSAM's own forward and this machine's matmul.

    python scripts/benchmark_inference.py                       # lite_medsam, a 600 x 500 picture, 3 repeats
    python scripts/benchmark_inference.py --encoder vit_b --image-size 384 --repeats 5

Rows (medians over --repeats calls after one warm-up call; times also as a ratio to the fp32 matmul):
- LiteMedSAM's reference forward on the picture and one box (the baseline a user compares with);
- the first prompt on a new picture through ``Predictor``: encoder plus decode at the picture's own size, in
  the default precisions (``auto``: what it means on this CPU is printed), with Predictor's default encoder
  engine (``auto``: OpenVINO for lite_medsam on a CPU) and with eager PyTorch, in Predictor's default decode
  mode (adaptive) and in the exact mode;
- a re-prompt with another box on the cached picture, in both modes;
- the first prompt and the re-prompt with fewer adaptive points (``--fewer-points``, default 2048 and 1024 at the
  output's level against the model's 4096): faster, for the loss of Dice measured in ``docs/speed.md``;
- the encoder alone, eager PyTorch and (lite_medsam) OpenVINO, with its achieved GFLOP/s and its ratio to the
  matmul rate; OpenVINO's one-off conversion of the graph is timed (or its read, when this encoder's graph is
  already in the disk cache);
- the decoder, exact and adaptive, at several output sizes, in float32 and, where this CPU runs it natively,
  bfloat16 (elsewhere the bfloat16 rows are skipped with the reason: emulated bfloat16 is several times slower).

It finishes in under 10 minutes on a slow CPU too (6 min 53 s on 2 AVX2-only cores): a row whose calls are
long times fewer of them (``--row-budget``, at least one after the warm-up), and an exact decode that the
smallest output size's time predicts (by area) to take longer than the budget per call is skipped, with that
estimate printed.

GFLOP counts are torch's FlopCounterMode (matmuls and convolutions). The model is random-init except for the
lite_medsam backbone's pretrained weights; speed does not depend on the weights. Peak RSS is ru_maxrss.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch
from benchmark_common import count_gflop, cpu_summary, matmul_gflops, median_seconds

from imedsam.inference import OpenVINOEncoder, Predictor, resolve_encoder_engine
from imedsam.networks import build_imedsam
from imedsam.networks.precision import cpu_runs_bfloat16_natively, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="lite_medsam")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input (default 256 for lite_medsam, else 384)")
    parser.add_argument("--picture", type=int, nargs=2, default=[500, 600], metavar=("H", "W"))
    parser.add_argument("--output-sizes", type=int, nargs="+", default=[256, 896])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--row-budget", type=float, default=20.0,
                        help="seconds of timed calls per row: fewer repeats for long calls (at least one); an exact "
                             "decode predicted to take longer than this per call is skipped")  # fmt: skip
    parser.add_argument("--fewer-points", type=int, nargs="*", default=[2048, 1024],
                        help="adaptive_points below the model's 4096 to time too (first prompt and re-prompt rows, "
                             "Predictor's defaults otherwise): a slow CPU's trade of Dice for time (docs/speed.md)")  # fmt: skip
    parser.add_argument("--precision", choices=["auto", "float32"], default="auto",
                        help="encoder and decoder precision of the Predictor rows; float32: the path a CPU without "
                             "native bfloat16 takes (with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                             "MKL_ENABLE_INSTRUCTIONS=AVX2, an AVX2-only CPU's kernels)")  # fmt: skip
    args = parser.parse_args()
    started_benchmark = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image_size = args.image_size or (256 if args.encoder == "lite_medsam" else 384)
    model = build_imedsam(args.encoder, image_size=image_size).eval()  # encoder/decoder_precision "auto", the default
    model.encoder_precision = model.decoder.precision = args.precision
    default_precision = resolve_precision(args.precision, "cpu")
    height, width = args.picture
    rng = np.random.default_rng(0)
    pictures = ((rng.random((height, width, 3)) * 255).astype(np.uint8) for _ in iter(int, 1))  # a new picture per call
    box = [0.2 * width, 0.25 * height, 0.7 * width, 0.8 * height]
    boxes = iter(rng.uniform([0, 0, 0.5, 0.5], [0.4, 0.4, 1, 1], (100000, 4)) * [width, height, width, height])
    native_bf16 = cpu_runs_bfloat16_natively() and args.precision == "auto"
    no_bf16_reason = ("--precision float32" if args.precision == "float32" else
                      "this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag); emulated, it is several times slower than float32")  # fmt: skip
    fp32 = matmul_gflops(torch.float32)
    print(f"I-MedSAM inference benchmark: encoder={args.encoder} image_size={image_size} picture {width}x{height} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} (medians)")  # fmt: skip
    print(f"CPU: {cpu_summary()} ({platform.machine()}); native bfloat16: {'yes' if native_bf16 else 'no'}")
    matmul_seconds = 2 * 2048**3 / fp32 / 1e9
    print(f"2048^2 matmul float32: {fp32:.0f} GFLOP/s, {matmul_seconds:.3f} s. 'matmuls': a time in those; "
          "'ratio': achieved GFLOP/s over the matmul's")  # fmt: skip
    print(f"{'':44s} {'seconds':>8s} {'matmuls':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'ratio':>6s}")

    def row(name: str, seconds: float, gflop: float | None = None) -> None:
        rate = f"{gflop:7.1f} {gflop / seconds:8.1f} {gflop / seconds / fp32:6.2f}" if gflop else ""
        print(f"{name:44s} {seconds:8.3f} {seconds / matmul_seconds:8.1f} {rate}")

    results = {}
    if args.encoder == "lite_medsam":
        from imedsam.networks.lite_medsam import LiteMedSAMReference

        reference = LiteMedSAMReference()
        picture = next(pictures)
        results["reference"] = median_seconds(lambda: reference(picture, box), args.repeats, args.row_budget)
        row("LiteMedSAM reference forward", results["reference"], count_gflop(lambda: reference(picture, box), inference=True))

    # Predictor's default encoder engine and decode mode (adaptive), then every pixel through the coarse INR
    # (exact), then the eager PyTorch encoder
    engine = resolve_encoder_engine("auto", model, "cpu")
    if engine == "openvino":  # the disk cache it fills is the one the Predictor rows then read
        compiled = OpenVINOEncoder(model)
        started = time.perf_counter()
        compiled(torch.rand(1, 3, image_size, image_size))
        how = "converting and compiling" if compiled.conversions else "reading (from its disk cache) and compiling"
        print(f"OpenVINO: {how} the encoder took {time.perf_counter() - started:.1f} s (conversion: once per set of weights)")

    def first_prompt(predictor: Predictor):
        predictor.set_image(next(pictures))
        return predictor.predict(box)

    runs = [("auto", "adaptive"), ("auto", "exact")] + ([("torch", "adaptive")] if engine != "torch" else [])
    for engine_choice, mode in runs:
        predictor = Predictor(model, cache_size=1, decode_mode=mode, encoder_engine=engine_choice)
        label = resolve_encoder_engine(engine_choice, model, "cpu")
        results[f"first {label} {mode}"] = median_seconds(lambda: first_prompt(predictor), args.repeats, args.row_budget)
        row(f"first prompt, {label} encoder + {mode} decode", results[f"first {label} {mode}"])
        if engine_choice == "auto":
            results[f"again {mode}"] = median_seconds(lambda: predictor.predict(next(boxes)), args.repeats, args.row_budget)
            row(f"re-prompt, {mode} decode {width}x{height}", results[f"again {mode}"])
    default_points = model.decoder.adaptive_points
    predictor = Predictor(model, cache_size=1)
    for points in args.fewer_points:
        model.decoder.adaptive_points = points
        key = f"first {engine} adaptive, {points} points"
        results[key] = median_seconds(lambda: first_prompt(predictor), args.repeats, args.row_budget)
        row(f"first prompt, {engine} + adaptive, {points} points", results[key])
        row(f"re-prompt, adaptive, {points} points", median_seconds(lambda: predictor.predict(next(boxes)), args.repeats, args.row_budget))
    model.decoder.adaptive_points = default_points
    tensor = torch.rand(1, 3, height, width)
    with torch.no_grad():
        model.encoder_precision = "float32"
        encoder_gflop = count_gflop(lambda: model.encode(tensor), inference=True)
        row("encoder float32", median_seconds(lambda: model.encode(tensor), args.repeats, args.row_budget), encoder_gflop)
        if native_bf16:  # the same work, so its ratio is the speed over the float32 matmul's
            model.encoder_precision = "bfloat16"
            row("encoder bfloat16 (autocast)", median_seconds(lambda: model.encode(tensor), args.repeats, args.row_budget), encoder_gflop)
        else:
            print(f"encoder bfloat16 row skipped: {no_bf16_reason}")
        if engine == "openvino":
            for precision in ("float32", "bfloat16") if native_bf16 else ("float32",):
                model.encoder_precision = precision
                call = lambda: model.encode(tensor, run_encoder=compiled)  # noqa: E731
                row(f"encoder OpenVINO {precision}", median_seconds(call, args.repeats, args.row_budget), encoder_gflop)
        model.encoder_precision = args.precision
        encoding = model.encode(tensor)
        prompt = torch.tensor([[box]], dtype=torch.float32)
        for precision in ("float32", "bfloat16"):
            if precision == "bfloat16" and not native_bf16:
                print(f"decoder bfloat16 rows skipped: {no_bf16_reason}")
                continue
            model.decoder.precision = precision
            for mode in ("exact", "adaptive"):
                smallest = None  # (pixels, seconds) of this mode's smallest output, for the exact decode's estimate
                for size in sorted(args.output_sizes):
                    name = f"decode {mode:8s} {precision:8s} {size:4d}^2"
                    if mode == "exact" and smallest is not None:
                        predicted = smallest[1] * size**2 / smallest[0]
                        if predicted > args.row_budget:
                            print(f"{name:44s} skipped: about {predicted:.0f} s a call by area from {int(smallest[0] ** 0.5)}^2 "
                                  f"(over --row-budget {args.row_budget:g} s)")  # fmt: skip
                            continue
                    call = lambda: model.decode(encoding, prompt, (size, size), mode=mode)  # noqa: E731
                    seconds = median_seconds(call, args.repeats, args.row_budget)
                    smallest = smallest or (size**2, seconds)
                    row(name, seconds, count_gflop(call, inference=True))
        model.decoder.precision = args.precision
    print(f"encoder and decoder precision {args.precision!r} here: {default_precision}")
    if "reference" in results:
        for key in (key for key in results if key.startswith("first ")):
            print(f"{key[6:]}: first prompt / LiteMedSAM reference forward: {results[key] / results['reference']:.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB; "
          f"benchmark wall time {time.perf_counter() - started_benchmark:.0f} s")


if __name__ == "__main__":
    main()
