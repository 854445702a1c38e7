#!/usr/bin/env python
"""Simulated active learning on a labeled pool: UGS against random and MONAI Label's epistemic ranking.

    python scripts/active_learning.py --runner embeddings --dataset_dir ../shared/data/kvasir_sessile \
        --split_file ../shared/data/splits/kvasir_sessile_split.json \
        --cross_domain_dir ../shared/data/cvc_clinicdb_sample --work_dir runs/active_learning \
        --output docs/results/active_learning.csv

The pool is the split's ``train`` list. For each ``--seeds`` value, a seed set of ``--seed_size`` images is
labeled; each round, each strategy picks ``--query_size`` more, the bundle's model is trained again from its
initial network (the pretrained ``lite_medsam`` by default) for ``--steps`` optimiser steps on what is
labeled, and evaluated on the ``test`` list, and on every image of ``--cross_domain_dir`` when given (see
:mod:`imedsam.active_learning` and :mod:`imedsam.evaluation.active_learning_runs`). ``--runner bundle``
trains through ``train.yaml``; ``--runner embeddings`` freezes the whole encoder and fine-tunes the parts
after it on cached embeddings, far cheaper. Writes ``--output`` (one row per seed, strategy and round), a PNG
of mean test Dice against labeled count with the spread across seeds, and a Markdown summary (``.md``) with
the per-count means and the paired UGS-minus-other differences.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import time
from collections import defaultdict

import numpy as np

from imedsam.active_learning import STRATEGIES, simulate_active_learning
from imedsam.data import polyp_datalist
from imedsam.evaluation import BundleRunner, EmbeddingRunner
from imedsam.metrics import score_box_baselines

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")


def dice_by_count(rows: list[dict], key: str = "test_dice") -> dict[str, dict[int, dict[int, float]]]:
    """``{strategy: {labeled: {seed: rows' key (test Dice)}}}``."""
    table: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row.get(key) not in (None, ""):
            table[row["strategy"]][row["labeled"]][row["seed"]] = float(row[key])
    return table


def labels_to_reach_random(rows: list[dict], key: str = "test_dice") -> list[str]:
    """For each strategy: the fewest labeled images at which its mean Dice reaches random selection's mean
    Dice at random's largest labeled count, and that count as a fraction of random's."""
    table = dice_by_count(rows, key)
    if "random" not in table:
        return []
    final_count = max(table["random"])
    target = float(np.mean(list(table["random"][final_count].values())))
    lines = [f"Random selection's final mean Dice ({key}): {target:.4f} at {final_count} labeled images."]
    for strategy in (s for s in STRATEGIES if s in table and s != "random"):
        reached = [c for c in sorted(table[strategy]) if np.mean(list(table[strategy][c].values())) >= target]
        if reached:
            lines.append(f"- {strategy} reaches it at {reached[0]} labeled images ({reached[0] / final_count:.0%} of random's labels).")
        else:
            best = max(np.mean(list(v.values())) for v in table[strategy].values())
            lines.append(f"- {strategy} does not reach it (its best mean: {best:.4f}).")
    return lines


def full_pool_line(rows: list[dict], key: str) -> list[str]:
    values = [float(row[key]) for row in rows if row["strategy"] == "full_pool" and row.get(key) not in (None, "")]
    if not values:
        return []
    count = next(row["labeled"] for row in rows if row["strategy"] == "full_pool")
    return [f"- the whole pool ({count} images), same budget: {np.mean(values):.4f} ± {np.std(values):.4f} ({len(values)} seeds)."]


def markdown_summary(rows: list[dict], box_dice: float | None, command: str) -> str:
    lines = dice_table(rows, "test_dice", "test") + [""] + labels_to_reach_random(rows, "test_dice") + full_pool_line(rows, "test_dice")
    if any(row.get("cross_dice") not in (None, "") for row in rows):
        lines += [""] + dice_table(rows, "cross_dice", "cross-domain") + [""] + labels_to_reach_random(rows, "cross_dice")
        lines += full_pool_line(rows, "cross_dice")
    if box_dice is not None:
        lines += ["", f"The tight box filled scores {box_dice:.4f} on the same test images (no model)."]
    lines += ["", "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)


def dice_table(rows: list[dict], key: str, what: str) -> list[str]:
    table = dice_by_count(rows, key)
    strategies = [s for s in STRATEGIES if s in table]
    if not strategies:
        return []
    counts = sorted({row["labeled"] for row in rows if row["strategy"] in STRATEGIES})
    seeds = sorted({row["seed"] for row in rows})
    lines = [
        f"Mean {what} Dice ± std across seeds ({', '.join(map(str, seeds))}), by labeled images; the paired differences "
        "are per seed (same seed set, same training seed), with their standard error.",
        "",
        "| labeled | " + " | ".join(strategies) + " | " + " | ".join(f"ugs − {s} (paired, mean ± s.e.)" for s in strategies if s != "ugs") + " |",
        "| --- |" + " --- |" * (len(strategies) + len([s for s in strategies if s != "ugs"])),
    ]
    for count in counts:
        cells = []
        for strategy in strategies:
            values = list(table[strategy][count].values())
            partial = f" (n={len(values)})" if 0 < len(values) < len(seeds) else ""  # fewer seeds ran this strategy
            cells.append(f"{np.mean(values):.4f} ± {np.std(values):.4f}{partial}" if values else "")
        for other in (s for s in strategies if s != "ugs"):
            common = sorted(set(table["ugs"][count]) & set(table[other][count])) if "ugs" in table else []
            diffs = [table["ugs"][count][seed] - table[other][count][seed] for seed in common]
            if len(diffs) > 1:
                cells.append(f"{np.mean(diffs):+.4f} ± {np.std(diffs, ddof=1) / np.sqrt(len(diffs)):.4f}")
            else:
                cells.append(f"{diffs[0]:+.4f} (one seed)" if diffs else "")
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: str, box_dice: float | None, title: str) -> None:
    """Mean Dice against labeled images, one line per strategy with the spread across seeds shaded and
    each seed's point drawn; a second panel for the cross-domain set when the rows have one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("test_dice", "test Dice")]
    if any(row.get("cross_dice") not in (None, "") for row in rows):
        panels.append(("cross_dice", "cross-domain Dice"))
    figure, axes_list = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axes, (key, label) in zip(axes_list[0], panels):
        table = dice_by_count(rows, key)
        for strategy in (s for s in STRATEGIES if s in table):
            counts = sorted(table[strategy])
            values = [list(table[strategy][c].values()) for c in counts]
            mean = np.array([np.mean(v) for v in values])
            std = np.array([np.std(v) for v in values])
            (line,) = axes.plot(counts, mean, marker="o", label=strategy)
            axes.fill_between(counts, mean - std, mean + std, color=line.get_color(), alpha=0.15)
            for count, per_seed in zip(counts, values):
                axes.scatter([count] * len(per_seed), per_seed, color=line.get_color(), s=8, alpha=0.5)
        ceiling = [float(row[key]) for row in rows if row["strategy"] == "full_pool" and row.get(key) not in (None, "")]
        if ceiling:
            axes.axhline(np.mean(ceiling), color="black", linestyle=":", linewidth=1, label="whole pool, same budget")
        if box_dice is not None and key == "test_dice" and box_dice >= axes.get_ylim()[0] - 0.05:
            # only when near the curves: a far-off line would flatten them (the summary gives the figure)
            axes.axhline(box_dice, color="gray", linestyle="--", linewidth=1, label="box filled (no model)")
        axes.set_xticks(sorted({row["labeled"] for row in rows if row["strategy"] in STRATEGIES}))
        axes.set_xlabel("labeled images")
        axes.set_ylabel(f"{label} (mean ± std across seeds)")
        axes.set_title(title, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split_file", required=True, help="JSON with train (the pool), val and test lists")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--full_pool", action="store_true",
                        help="also train once per seed on the whole pool with the same budget (the ceiling of labeling everything)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed_size", type=int, default=8)
    parser.add_argument("--query_size", type=int, default=8, help="images labeled per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="optimiser steps per training, the same every round")
    parser.add_argument("--mc_passes", type=int, default=10, help="stochastic passes of the epistemic score (MONAI Label's default)")
    parser.add_argument("--runner", default="bundle", choices=("bundle", "embeddings"),
                        help="bundle: train.yaml every round; embeddings: frozen encoder, cached embeddings (lora_rank 0, fa_mode none)")
    parser.add_argument("--cross_domain_dir", help="a second dataset (images/ + masks/) every model is also evaluated on, all of it")
    parser.add_argument("--score_size", type=int, help="output size the scored strategies decode the unlabeled images at (default: label_size)")
    parser.add_argument("--encoder", default="vit_tiny")
    parser.add_argument("--sam_checkpoint")
    parser.add_argument("--initial_checkpoint", help="an I-MedSAM state dict every training starts from (the bundle's initial_checkpoint)")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--label_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_label_size", type=int, help="output grid the decoder trains at (default: label_size)")
    parser.add_argument("--train_query_size", type=int,
                        help="rows and columns of the label grid each training step decodes "
                             "(default: every pixel, as in docs/results.md)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--encoder_lr_scale", type=float, default=1.0)
    parser.add_argument("--bundle_dir", default=BUNDLE)
    parser.add_argument("--work_dir", default="runs/active_learning", help="each round's split, checkpoint and evaluation")
    parser.add_argument("--output", default="runs/active_learning/active_learning.csv")
    parser.add_argument("--combine", nargs="+", metavar="CSV",
                        help="train nothing: write --output, its plot and summary from the rows of these earlier results "
                             "(studies of one setting run in parts, e.g. one seed per process)")
    args = parser.parse_args(argv)
    for path in (args.dataset_dir, args.split_file, args.bundle_dir, *([args.initial_checkpoint] if args.initial_checkpoint else [])):
        if not os.path.exists(path):
            parser.exit(2, f"active_learning: error: not found: {path}\n")
    try:
        import matplotlib  # noqa: F401  # fail before hours of training, not after
    except ImportError:
        parser.exit(2, "active_learning: error: the plot needs matplotlib: pip install 'imedsam[study]'\n")

    overrides = {"encoder": args.encoder, "image_size": args.image_size, "label_size": args.label_size, "batch_size": args.batch_size,
                 "learning_rate": args.learning_rate, "encoder_lr_scale": args.encoder_lr_scale,
                 "train_label_size": args.train_label_size or args.label_size,
                 "train_query_size": args.train_query_size or args.train_label_size or args.label_size}
    if args.sam_checkpoint:
        overrides["sam_checkpoint"] = args.sam_checkpoint
    if args.initial_checkpoint:
        overrides["initial_checkpoint"] = os.path.abspath(args.initial_checkpoint)
    if args.runner == "embeddings":
        if args.cross_domain_dir and not os.path.isdir(args.cross_domain_dir):
            parser.exit(2, f"active_learning: error: not found: {args.cross_domain_dir}\n")
        overrides.update(lora_rank=0, fa_mode="none", freeze_sam=True)
        runner = EmbeddingRunner(
            os.path.abspath(args.bundle_dir), os.path.abspath(args.dataset_dir), overrides, args.cross_domain_dir,
            train_label_size=overrides["train_label_size"], query_size=overrides["train_query_size"],
        )
    else:
        if args.cross_domain_dir:
            parser.exit(2, "active_learning: error: --cross_domain_dir needs --runner embeddings\n")
        runner = BundleRunner(os.path.abspath(args.bundle_dir), os.path.abspath(args.dataset_dir), overrides)
    started = time.perf_counter()
    command = shlex.join(["python", "scripts/active_learning.py", *(argv if argv is not None else sys.argv[1:])])
    if args.combine:
        rows = combined_rows(args.combine)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        write_report(rows, args, command)
        print(f"results: {args.output} ({len(rows)} rows from {len(args.combine)} files)")
        return 0

    def report(row):
        print(f"seed {row['seed']} {row['strategy']:>9} round {row['round']} ({row['labeled']:>3} labeled): test Dice {row['test_dice']:.4f}, "
              f"train {row['train_s']} s, score {row['score_s']} s  [{time.perf_counter() - started:.0f} s]", flush=True)

    rows = simulate_active_learning(
        runner, os.path.abspath(args.split_file), args.work_dir, args.strategies, args.seeds, args.seed_size,
        args.query_size, args.rounds, args.steps, args.mc_passes, on_row=report, score_size=args.score_size,
        full_pool=args.full_pool,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    shutil.copyfile(os.path.join(args.work_dir, "results.csv"), args.output)
    write_report(rows, args, command)
    stem = os.path.splitext(args.output)[0]
    print(f"results: {args.output}, {stem}.png, {stem}.md ({time.perf_counter() - started:.0f} s in all)")
    return 0


def combined_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier results files; a (seed, strategy, round) found twice is refused."""
    rows, seen = [], {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = (row["seed"], row["strategy"], row["round"])
                if key in seen:
                    raise ValueError(f"seed {key[0]}, {key[1]}, round {key[2]} is in both {seen[key]} and {path}")
                seen[key] = path
                rows.append({**row, "seed": int(row["seed"]), "round": int(row["round"]), "labeled": int(row["labeled"])})
    if not rows:
        raise ValueError(f"no result rows in {', '.join(paths)}")
    return sorted(rows, key=lambda row: (row["seed"], row["strategy"], row["round"]))


def write_report(rows: list[dict], args: argparse.Namespace, command: str) -> None:
    """The plot (``.png``) and the Markdown summary (``.md``) beside ``args.output``."""
    test_items = polyp_datalist(args.dataset_dir, "test", args.split_file)
    box_dice = score_box_baselines(test_items, args.label_size)["box_filled"]["dice"]["mean"]
    stem = os.path.splitext(args.output)[0]
    seeds = sorted({row["seed"] for row in rows})
    title = (f"{args.encoder} at {args.image_size}², {args.steps} steps per training, "
             f"{args.query_size} images per round, seeds {' '.join(map(str, seeds))}")
    plot(rows, stem + ".png", box_dice, title)
    with open(stem + ".md", "w") as f:
        f.write(markdown_summary(rows, box_dice, command))


if __name__ == "__main__":
    raise SystemExit(main())
