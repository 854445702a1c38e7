#!/usr/bin/env python
"""The paper's evaluation protocols for one trained model, as one Markdown table beside the box baselines.

    python scripts/evaluate_protocols.py --checkpoint runs/kvasir/models/model.pt \
        --dataset_dir ../shared/data/kvasir_sessile --split_file ../shared/data/splits/kvasir_sessile_split.json \
        --cross_domain_dir ../shared/data/cvc_clinicdb_sample --output docs/results/protocols.md

Rows (each one run of the bundle's evaluate.yaml, ``python -m monai.bundle run``, in its own process):

- in-domain: the test split at the training resolution (``--train_size``: 256, lite_medsam's input; the paper: 384);
- cross-resolution: the same test split at the other ``--label_sizes`` (384 and 896);
- cross-domain: every image of ``--cross_domain_dir`` (CVC-ClinicDB for a Kvasir-Sessile model), at the
  training resolution.

Each row also gives what the box prompt alone scores on the same images at the same size: the tight box
filled and the ellipse inscribed in it. Writes the table to ``--output``, the figures to the same name with
``.json``, and each evaluation's ``per_image.csv`` / ``summary.json`` / overlays under ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from imedsam.data import polyp_datalist
from imedsam.metrics import score_box_baselines

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs")


def protocol_rows(args) -> list[dict]:
    rows = [{"protocol": "in-domain", "data": args.dataset_dir, "split_file": args.split_file, "split": "test", "size": args.train_size}]
    for size in args.label_sizes:
        if size != args.train_size:
            rows.append({"protocol": "cross-resolution", "data": args.dataset_dir, "split_file": args.split_file, "split": "test", "size": size})
    if args.cross_domain_dir:
        rows.append({"protocol": "cross-domain", "data": args.cross_domain_dir, "split_file": None, "split": "all", "size": args.train_size})
    return rows


def evaluate_command(args, row: dict, output_dir: str) -> list[str]:
    configs = os.path.relpath(CONFIGS)
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{configs}/train.yaml','{configs}/evaluate.yaml']",
        "--ckpt_file", args.checkpoint, "--encoder", args.encoder, "--image_size", str(args.image_size),
        "--dataset_dir", row["data"], "--eval_split", row["split"], "--label_size", str(row["size"]),
        "--decode_mode", args.decode_mode, "--decoder_precision", args.decoder_precision, "--output_dir", output_dir,
    ]
    if row["split_file"]:
        command += ["--split_file", row["split_file"]]
    if args.sam_checkpoint:
        command += ["--sam_checkpoint", args.sam_checkpoint]
    for key, value in args.set:
        command += [f"--{key}", value]
    return command


def shell_command(command: list[str]) -> str:
    """``command`` as a shell line; the bundle's config list (``['a.yaml','b.yaml']``) goes in double quotes,
    as the README writes it."""
    return " ".join(f'"{part}"' if part.startswith("['") else shlex.quote(part) for part in command)


def _cell(summary: dict, metric: str, digits: int = 4, spread: bool = False) -> str:
    value = summary[metric]["mean"]
    text = f"{value:.{digits}f}"
    return f"{text} ± {summary[metric]['std']:.{digits}f}" if spread else text


def markdown_table(results: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| protocol | data | split | label size | images | Dice | IoU | HD95 (px) | Boundary IoU | box filled, Dice | ellipse in box, Dice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        model, baselines = r["model"], r["baselines"]
        lines.append(
            f"| {r['protocol']} | {os.path.basename(os.path.normpath(r['data']))} | {r['split']} | {r['size']} | {model['count']} "
            f"| {_cell(model, 'dice', spread=True)} | {_cell(model, 'iou')} | {_cell(model, 'hd95', 1)} | {_cell(model, 'boundary_iou')} "
            f"| {_cell(baselines['box_filled'], 'dice')} | {_cell(baselines['ellipse_in_box'], 'dice')} |"
        )
    lines += ["", "Commands (one evaluation each):", "", "```bash"] + [r["command"] for r in results] + ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the trained I-MedSAM state dict (the bundle's models/model.pt)")
    parser.add_argument("--encoder", default="lite_medsam")
    parser.add_argument(
        "--image_size", type=int, help="the encoder's input size the model was trained with (default: 256 for lite_medsam, else 384)"
    )
    parser.add_argument("--sam_checkpoint")
    parser.add_argument("--dataset_dir", required=True, help="the in-domain dataset folder")
    parser.add_argument("--split_file")
    parser.add_argument("--cross_domain_dir", help="a dataset folder from another centre; every image is evaluated")
    parser.add_argument("--train_size", type=int, default=256, help="the training output resolution: the in-domain row")
    parser.add_argument("--label_sizes", type=int, nargs="+", default=[256, 384, 896])
    parser.add_argument("--decode_mode", default="exact", choices=["exact", "adaptive"])
    parser.add_argument("--decoder_precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument(
        "--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="a bundle key for every evaluation, as the model was trained (e.g. --set fa_mode none --set lora_rank 0)",
    )
    parser.add_argument("--work_dir", default="runs/protocols", help="each evaluation's CSV, summary and overlays")
    parser.add_argument("--output", default="runs/protocols/protocols.md")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 256 if args.encoder == "lite_medsam" else 384
    if not os.path.isfile(args.checkpoint):
        parser.exit(2, f"evaluate_protocols: error: checkpoint not found: {args.checkpoint}\n")

    results = []
    for row in protocol_rows(args):
        name = f"{row['protocol']}_{os.path.basename(os.path.normpath(row['data']))}_{row['size']}"
        output_dir = os.path.join(args.work_dir, name)
        command = evaluate_command(args, row, output_dir)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            parser.exit(1, f"evaluate_protocols: error: the {row['protocol']} evaluation at {row['size']} failed: {shell_command(command)}\n")
        with open(os.path.join(output_dir, "summary.json")) as f:
            model = json.load(f)
        datalist = polyp_datalist(row["data"], row["split"], row["split_file"])
        baselines = score_box_baselines(datalist, row["size"])
        seconds = time.perf_counter() - started
        results.append({**row, "model": model, "baselines": baselines, "seconds": round(seconds, 1), "command": shell_command(["python", *command[1:]])})
        print(f"{row['protocol']:>16} {name}: Dice {model['dice']['mean']:.4f} (box {baselines['box_filled']['dice']['mean']:.4f}, "
              f"ellipse {baselines['ellipse_in_box']['dice']['mean']:.4f}) in {seconds:.0f} s", flush=True)

    header = (
        f"Model `{args.checkpoint}` ({args.encoder}, image size {args.image_size}, decode {args.decode_mode}, "
        f"{args.decoder_precision}); boxes are the tight ground-truth boxes."
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(markdown_table(results, header))
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"checkpoint": args.checkpoint, "encoder": args.encoder, "image_size": args.image_size, "rows": results}, f, indent=1)
    print(f"table: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
