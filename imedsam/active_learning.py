"""Simulated annotation rounds: which unlabeled images should be labeled next?

A pool of labeled images (e.g. a training split) is treated as unlabeled except for a small seed set. Each
round a strategy picks ``query_size`` images, their masks are "revealed", the model is trained again from
the same start with the same number of optimiser steps, and scored on a fixed test split
(:func:`simulate_active_learning`). A runner does the training and scoring: :class:`BundleRunner` (the
bundle's ``train.yaml`` and ``evaluate.yaml``) or :class:`EmbeddingRunner` (a frozen encoder's cached
embeddings); both live in :mod:`imedsam.evaluation.active_learning_runs` and are importable from here too.

Strategies (:data:`STRATEGIES`). The unlabeled images have no box yet, so a scored strategy needs one:

* ``ugs``: the highest UGS score (:func:`imedsam.metrics.ugs_score`: the implicit decoder's MC-dropout
  variance over the predicted region in the box) in the box the model's head proposes, as the MONAI Label
  app scores an image nobody has prompted;
* ``ugs_whole_image``: the same score with the whole image as the box (the app's rule before the head);
* ``epistemic``: the highest MC-dropout entropy (:func:`imedsam.metrics.mc_dropout_entropy`), the score
  of MONAI Label's epistemic strategy, from ``mc_passes`` stochastic passes, in the proposed box;
* ``random``: uniform, seeded.

Training and evaluation use the tight boxes of the ground truth: once an image is picked the annotator
draws its box, and the mask is what costs.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from imedsam.data import polyp_datalist
from imedsam.evaluation.active_learning_runs import BundleRunner, EmbeddingRunner, image_extent, write_split  # noqa: F401 (re-exported)
from imedsam.metrics import mc_dropout_entropy, ugs_score
from imedsam.networks import IMedSAM, ImageEncoding

__all__ = [
    "STRATEGIES", "SCORED_STRATEGIES", "BundleRunner", "EmbeddingRunner", "score_images", "scoring_box", "select_images",
    "simulate_active_learning",
]  # fmt: skip

STRATEGIES = ("ugs", "ugs_whole_image", "epistemic", "random")
#: strategy -> (score, box the unlabeled image is scored in)
SCORED_STRATEGIES = {"ugs": ("ugs", "proposed"), "ugs_whole_image": ("ugs", "whole_image"), "epistemic": ("epistemic", "proposed")}
SCORE_METHODS = ("ugs", "epistemic")
BOX_SOURCES = ("given", "proposed", "whole_image")
RESULT_FIELDS = (
    "seed", "strategy", "round", "labeled", "test_dice", "test_dice_std", "cross_dice", "cross_dice_std", "val_dice",
    "train_s", "score_s", "added",
)  # fmt: skip


def select_images(strategy: str, unlabeled: Sequence[str], k: int, scores: dict[str, float] | None = None, rng=None) -> list[str]:
    """The ``k`` images of ``unlabeled`` to label next.

    A scored strategy (``ugs``, ``ugs_whole_image``, ``epistemic``) takes the ``k`` highest ``scores`` (ties by
    name); ``random`` draws with ``rng`` (a ``numpy.random.Generator``).

    Example::

        >>> select_images("ugs", ["a", "b", "c"], 2, {"a": 0.1, "b": 0.9, "c": 0.5})
        ['b', 'c']
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not 0 < k <= len(unlabeled):
        raise ValueError(f"cannot pick {k} of {len(unlabeled)} unlabeled images")
    if strategy == "random":
        if rng is None:
            raise ValueError("the random strategy needs rng, a numpy.random.Generator")
        return [str(name) for name in rng.choice(sorted(unlabeled), size=k, replace=False)]
    if scores is None or any(name not in scores for name in unlabeled):
        raise ValueError(f"the {strategy} strategy needs a score for every unlabeled image")
    return sorted(unlabeled, key=lambda name: (-scores[name], name))[:k]


def _mc_dropout_mode(network: IMedSAM) -> None:
    # Dropout draws afresh at every pass while BatchNorm keeps its running statistics: MONAI Label's
    # epistemic scoring switches the whole model to train mode, which with BatchNorm would normalise by
    # (and update the running statistics with) each image's own points.
    network.eval()
    network.decoder.train()
    for module in network.decoder.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def _square_encoding(network: IMedSAM, item: dict) -> ImageEncoding:
    # The bundle's frame: the image letterboxed into the encoder's square (the item's "image" is already
    # padded), so boxes and maps are in pixels of that square. A cached "embedding" skips the encoder.
    if "embedding" in item:
        embedding = item["embedding"].unsqueeze(0)
    else:
        embedding = network.encode(item["image"].unsqueeze(0).float()).embedding
    side = network.image_size
    return ImageEncoding(embedding, side, side)


def scoring_box(network: IMedSAM, item: dict, source: str, encoding: ImageEncoding | None = None) -> torch.Tensor:
    """The ``[1, 4]`` box (pixels of the encoder's square) an unlabeled item is scored in.

    ``given``: the item's own ``box``; ``whole_image``: the part of the square the image fills (its
    ``extent``, ``(fy, fx)``; the padding is left out); ``proposed``: the model's box proposal
    (:meth:`~imedsam.networks.IMedSAM.propose_boxes`) within that part, from ``encoding`` when the caller
    already has the item's square encoding.
    """
    if source not in BOX_SOURCES:
        raise ValueError(f"box source must be one of {BOX_SOURCES}, got {source!r}")
    if source == "given":
        return item["box"].reshape(1, 4).float()
    side = network.image_size
    fy, fx = item.get("extent", (1.0, 1.0))
    height, width = max(1, round(side * fy)), max(1, round(side * fx))
    if source == "whole_image":
        return torch.tensor([[0.0, 0.0, float(width), float(height)]])
    encoding = encoding or _square_encoding(network, item)
    return network.propose_boxes(ImageEncoding(encoding.embedding, height, width, (fy, fx))).boxes.reshape(1, 4).cpu()


@torch.no_grad()
def score_images(
    network: IMedSAM, items: Sequence[dict], method: str, label_size: int, mc_passes: int = 10, box_source: str = "given"
) -> dict[str, float]:
    """Score preprocessed items (``image [3, S, S]`` or a cached ``embedding``, ``box [1, 4]`` in image pixels,
    ``extent``, ``name``) with ``method`` in the box :func:`scoring_box` gives for ``box_source``.

    ``ugs``: one decoding at ``label_size``, :func:`~imedsam.metrics.ugs_score` of its uncertainty map over the
    predicted mask in the box. ``epistemic``: ``mc_passes`` decodings with dropout on,
    :func:`~imedsam.metrics.mc_dropout_entropy` of their probabilities. Higher means less sure.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
    if network.decoder is None:
        raise ValueError("uncertainty scores need the implicit decoder; this model has use_inr=False")
    was_training = network.training
    size = (label_size, label_size)
    scale = label_size / network.image_size
    scores = {}
    try:
        network.eval()
        for item in items:
            encoding = _square_encoding(network, item)
            box = scoring_box(network, item, box_source, encoding).reshape(1, 1, 4).to(encoding.embedding.device)
            if method == "ugs":
                # every point of the label grid: an adaptive decode would interpolate most of the uncertainty
                out = network.decode_all(encoding, box, size, mode="exact")
                scores[item["name"]] = ugs_score(out.uncertainty[0, 0], out.logits[0, 0] > 0, (box[0, 0] * scale).tolist())
            else:
                _mc_dropout_mode(network)
                passes = [torch.sigmoid(network.decode(encoding, box, size, mode="exact")[0, 0]) for _ in range(mc_passes)]
                network.eval()
                scores[item["name"]] = mc_dropout_entropy(torch.stack(passes))
    finally:
        network.train(was_training)
    return scores


def _write_row(path: str, row: dict) -> None:
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def simulate_active_learning(
    runner: BundleRunner,
    split_file: str,
    work_dir: str,
    strategies: Sequence[str] = STRATEGIES,
    seeds: Sequence[int] = (0, 1, 2),
    seed_size: int = 8,
    query_size: int = 8,
    rounds: int = 3,
    steps: int = 120,
    mc_passes: int = 10,
    on_row: Callable[[dict], None] | None = None,
    score_size: int | None = None,
    full_pool: bool = False,
) -> list[dict]:
    """Run every strategy for ``rounds`` rounds from the same seed set, for each seed.

    The pool is the ``train`` split of ``split_file``; training validates on its ``val`` split and the
    reported Dice is on its ``test`` split. For one seed, all strategies share the seed set and the round-0
    model, and round ``r`` trains with the same training seed whichever strategy chose the data, so the
    strategies differ only in the images they picked. Each result row is appended to
    ``work_dir/results.csv`` as soon as it exists; ``work_dir/selections.json`` lists the picked images.
    The scored strategies decode the unlabeled images at ``score_size`` (default: the runner's label size).
    With ``full_pool``, each seed also trains once on the whole pool with the same budget (strategy
    ``full_pool``): what labeling everything would give, the ceiling the strategies approach.
    A ``work_dir`` that already holds a ``results.csv`` is refused rather than overwritten.
    """
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    with open(split_file) as f:
        split = json.load(f)
    pool_items = polyp_datalist(runner.dataset_dir, "train", split_file)
    pool = sorted(item["name"] for item in pool_items)
    if seed_size + rounds * query_size > len(pool):
        raise ValueError(f"{seed_size} seed images + {rounds} rounds x {query_size} need {seed_size + rounds * query_size} images; the pool has {len(pool)}")
    label_size = int(runner.overrides.get("label_size", 384))
    results_csv = os.path.join(work_dir, "results.csv")
    if os.path.exists(results_csv):
        raise FileExistsError(f"{results_csv} holds an earlier study's results: choose another work_dir or move it away")
    os.makedirs(work_dir, exist_ok=True)
    preprocessed: dict[str, dict] = {}

    def items(names):
        wanted = set(names)
        missing = [item for item in pool_items if item["name"] in wanted and item["name"] not in preprocessed]
        preprocessed.update({item["name"]: item for item in runner.preprocess(missing)})
        return [preprocessed[name] for name in names]

    def round_split(labeled):
        # only the labeled part changes between rounds; validation and test stay the split's own
        return {"train": sorted(labeled), "val": split["val"], "test": split["test"]}

    rows, selections = [], {}

    def record(seed, strategy, round_index, labeled, test, val_dice, train_s, score_s, added):
        cross = test.get("cross_dice") or {}
        row = {"seed": seed, "strategy": strategy, "round": round_index, "labeled": len(labeled), "test_dice": test["dice"]["mean"],
               "test_dice_std": test["dice"]["std"], "cross_dice": cross.get("mean", ""), "cross_dice_std": cross.get("std", ""),
               "val_dice": val_dice, "train_s": round(train_s, 1), "score_s": round(score_s, 1), "added": " ".join(added)}
        rows.append(row)
        _write_row(results_csv, row)
        if on_row:
            on_row(row)

    for seed in seeds:
        seed_set = sorted(str(name) for name in np.random.default_rng(seed).choice(pool, size=seed_size, replace=False))
        start = time.perf_counter()
        run_dir = os.path.join(work_dir, f"seed{seed}", "round0")
        checkpoint0, val0 = runner.train(round_split(seed_set), run_dir, steps, seed=seed * 1000)
        train0 = time.perf_counter() - start
        test0 = runner.evaluate(checkpoint0, os.path.join(run_dir, "split.json"), run_dir)
        scores_by_model: dict[tuple[str, str], dict[str, float]] = {}
        for strategy in strategies:
            labeled, checkpoint = list(seed_set), checkpoint0
            rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
            picks: list[list[str]] = []
            record(seed, strategy, 0, labeled, test0, val0, train0, 0.0, [])
            for round_index in range(1, rounds + 1):
                taken = set(labeled)
                unlabeled = [name for name in pool if name not in taken]
                start = time.perf_counter()
                scores = None
                if strategy in SCORED_STRATEGIES:
                    key = (checkpoint, strategy)
                    if key not in scores_by_model:
                        method, box_source = SCORED_STRATEGIES[strategy]
                        scores_by_model[key] = score_images(
                            runner.load_network(checkpoint), items(unlabeled), method, score_size or label_size, mc_passes, box_source
                        )
                    scores = scores_by_model[key]
                added = select_images(strategy, unlabeled, query_size, scores, rng)
                score_s = time.perf_counter() - start
                labeled += added
                picks.append(added)
                run_dir = os.path.join(work_dir, f"seed{seed}", strategy, f"round{round_index}")
                start = time.perf_counter()
                checkpoint, val_dice = runner.train(round_split(labeled), run_dir, steps, seed=seed * 1000 + round_index)
                train_s = time.perf_counter() - start
                test = runner.evaluate(checkpoint, os.path.join(run_dir, "split.json"), run_dir)
                record(seed, strategy, round_index, labeled, test, val_dice, train_s, score_s, added)
            selections[f"seed{seed}/{strategy}"] = {"seed_set": seed_set, "rounds": picks}
            with open(os.path.join(work_dir, "selections.json"), "w") as f:
                json.dump(selections, f, indent=1)
        if full_pool:
            run_dir = os.path.join(work_dir, f"seed{seed}", "full_pool")
            start = time.perf_counter()
            checkpoint, val_dice = runner.train(round_split(pool), run_dir, steps, seed=seed * 1000 + rounds)
            train_s = time.perf_counter() - start
            test = runner.evaluate(checkpoint, os.path.join(run_dir, "split.json"), run_dir)
            record(seed, "full_pool", rounds, pool, test, val_dice, train_s, 0.0, [])
    return rows
