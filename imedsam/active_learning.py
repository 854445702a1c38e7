"""Simulated annotation rounds: which unlabeled images should be labeled next?

A pool of labeled images (e.g. a training split) is treated as unlabeled except for a small seed set. Each
round a strategy picks ``query_size`` images, their masks are "revealed", the model is retrained from
scratch with the same number of optimiser steps, and scored on a fixed test split. Training and evaluation
go through the bundle's ``train.yaml`` and ``evaluate.yaml``, so a round is what
``python -m monai.bundle run`` does on that labeled set.

Strategies (:data:`STRATEGIES`):

* ``ugs``: the highest UGS score (:func:`imedsam.metrics.ugs_score`: the implicit decoder's MC-dropout
  variance over the predicted region in the box), what the MONAI Label app's ``ugs`` strategy ranks by;
* ``epistemic``: the highest MC-dropout entropy (:func:`imedsam.metrics.mc_dropout_entropy`), the score
  of MONAI Label's epistemic strategy, from ``mc_passes`` stochastic passes;
* ``random``: uniform, seeded.

Box prompts are the tight boxes of the ground truth: the annotator draws the box in any case, the mask is
what costs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from torch.nn.modules.batchnorm import _BatchNorm

from imedsam.data import polyp_datalist
from imedsam.metrics import mc_dropout_entropy, ugs_score
from imedsam.networks import IMedSAM

__all__ = ["STRATEGIES", "SCORED_STRATEGIES", "BundleRunner", "score_images", "select_images", "simulate_active_learning"]

STRATEGIES = ("ugs", "epistemic", "random")
SCORED_STRATEGIES = ("ugs", "epistemic")
RESULT_FIELDS = ("seed", "strategy", "round", "labeled", "test_dice", "test_dice_std", "val_dice", "train_s", "score_s", "added")


def select_images(strategy: str, unlabeled: Sequence[str], k: int, scores: dict[str, float] | None = None, rng=None) -> list[str]:
    """The ``k`` images of ``unlabeled`` to label next.

    ``ugs`` and ``epistemic`` take the ``k`` highest ``scores`` (ties by name); ``random`` draws with ``rng``
    (a ``numpy.random.Generator``).

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


@torch.no_grad()
def score_images(network: IMedSAM, items: Sequence[dict], method: str, label_size: int, mc_passes: int = 10) -> dict[str, float]:
    """Score preprocessed items (``image [3, S, S]``, ``box [1, 4]`` in image pixels, ``name``) with ``method``.

    ``ugs``: one decoding at ``label_size``, :func:`~imedsam.metrics.ugs_score` of its uncertainty map over the
    predicted mask in the box. ``epistemic``: ``mc_passes`` decodings with dropout on,
    :func:`~imedsam.metrics.mc_dropout_entropy` of their probabilities. Higher means less sure.
    """
    if method not in SCORED_STRATEGIES:
        raise ValueError(f"method must be one of {SCORED_STRATEGIES}, got {method!r}")
    if network.decoder is None:
        raise ValueError("uncertainty scores need the implicit decoder; this model has use_inr=False")
    was_training = network.training
    size = (label_size, label_size)
    scores = {}
    try:
        if method == "ugs":
            network.eval()
        else:
            _mc_dropout_mode(network)
        for item in items:
            image, box = item["image"].unsqueeze(0).float(), item["box"].reshape(1, 1, 4).float()
            if method == "ugs":
                out = network(image, box, size, return_all=True)
                scale = label_size / image.shape[-1]
                scores[item["name"]] = ugs_score(out.uncertainty[0, 0], out.logits[0, 0] > 0, (box[0, 0] * scale).tolist())
            else:
                encoding = network.encode(image)
                passes = [torch.sigmoid(network.decode(encoding, box, size)[0, 0]) for _ in range(mc_passes)]
                scores[item["name"]] = mc_dropout_entropy(torch.stack(passes))
    finally:
        network.train(was_training)
    return scores


@dataclass
class BundleRunner:
    """Train and evaluate the bundle on a labeled subset of a dataset folder, in this process.

    Args:
        bundle_dir: the bundle (its ``configs/train.yaml``, ``evaluate.yaml`` and ``metadata.json``).
        dataset_dir: ``images/`` + ``masks/``.
        overrides: top-level keys of ``train.yaml`` for every run (``encoder``, ``image_size``,
            ``label_size``, ``batch_size``, ...).
    """

    bundle_dir: str
    dataset_dir: str
    overrides: dict = field(default_factory=dict)

    def _config(self, name: str) -> str:
        return os.path.join(self.bundle_dir, "configs", name)

    def _workflow(self, config_files, run_dir: str, workflow_type, **overrides) -> ConfigWorkflow:
        return ConfigWorkflow(
            config_file=config_files,
            meta_file=self._config("metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            bundle_root=self.bundle_dir,
            dataset_dir=self.dataset_dir,
            ckpt_dir=os.path.join(run_dir, "models"),
            output_dir=os.path.join(run_dir, "eval"),
            **{**self.overrides, **overrides},
        )

    def train(self, split: dict[str, list[str]], run_dir: str, steps: int, seed: int) -> tuple[str, float]:
        """Train for about ``steps`` optimiser steps on ``split["train"]``, from the bundle's initial network
        (random init, or ``initial_checkpoint`` when the overrides name one); the model is validated once, at
        the end, on ``split["val"]``. Returns the checkpoint and that validation Dice."""
        os.makedirs(run_dir, exist_ok=True)
        split_file = os.path.join(run_dir, "split.json")
        with open(split_file, "w") as f:
            json.dump(split, f, indent=1)
        batch_size = int(self.overrides.get("batch_size", 2))
        epochs = max(1, math.ceil(steps / math.ceil(len(split["train"]) / batch_size)))
        workflow = self._workflow(
            self._config("train.yaml"), run_dir, "train", split_file=split_file, max_epochs=epochs, val_interval=epochs, seed=seed
        )
        workflow.initialize()
        workflow.run()
        val_dice = float(workflow.parser.get_parsed_content("validate#evaluator").state.best_metric)
        workflow.finalize()
        checkpoint = os.path.join(run_dir, "models", "model.pt")
        if not os.path.isfile(checkpoint):
            raise RuntimeError(f"training in {run_dir} wrote no checkpoint")
        return checkpoint, val_dice

    def evaluate(self, checkpoint: str, split_file: str, run_dir: str) -> dict:
        """``evaluate.yaml`` on the test split of ``split_file``: its ``summary.json``."""
        workflow = self._workflow(
            [self._config("train.yaml"), self._config("evaluate.yaml")], run_dir, None,
            split_file=split_file, ckpt_file=checkpoint, eval_split="test", overlays=0,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        with open(os.path.join(run_dir, "eval", "summary.json")) as f:
            return json.load(f)

    def _parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(self._config("train.yaml"))
        parser.update({"bundle_root": self.bundle_dir, "dataset_dir": self.dataset_dir, **self.overrides})
        return parser

    def load_network(self, checkpoint: str) -> IMedSAM:
        return self._parser().get_parsed_content("network_def", lazy=False).load_checkpoint(checkpoint)

    def preprocess(self, datalist: Sequence[dict]) -> list[dict]:
        """The validation transforms of ``train.yaml`` (image at ``image_size``, tight box, label at
        ``label_size``) on each item."""
        transform = self._parser().get_parsed_content("validate#preprocessing")
        return [{**transform(dict(item)), "name": item["name"]} for item in datalist]


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
) -> list[dict]:
    """Run every strategy for ``rounds`` rounds from the same seed set, for each seed.

    The pool is the ``train`` split of ``split_file``; training validates on its ``val`` split and the
    reported Dice is on its ``test`` split. For one seed, all strategies share the seed set and the round-0
    model, and round ``r`` trains with the same training seed whichever strategy chose the data, so the
    strategies differ only in the images they picked. Each result row is appended to
    ``work_dir/results.csv`` as soon as it exists; ``work_dir/selections.json`` lists the picked images.
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
        row = {"seed": seed, "strategy": strategy, "round": round_index, "labeled": len(labeled), "test_dice": test["dice"]["mean"],
               "test_dice_std": test["dice"]["std"], "val_dice": val_dice, "train_s": round(train_s, 1),
               "score_s": round(score_s, 1), "added": " ".join(added)}
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
                        scores_by_model[key] = score_images(runner.load_network(checkpoint), items(unlabeled), strategy, label_size, mc_passes)
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
    return rows
