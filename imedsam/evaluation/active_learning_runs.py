"""The two runners of the active-learning simulation (:func:`imedsam.active_learning.simulate_active_learning`):
each trains a model on a labeled subset of a dataset folder and scores it on a fixed test split.

* :class:`BundleRunner` trains and evaluates through the bundle's ``train.yaml`` and ``evaluate.yaml``, so a
  round is what ``python -m monai.bundle run`` does on that labeled set;
* :class:`EmbeddingRunner` keeps the encoder frozen (no LoRA, no adapter), computes each image's embedding
  once, and fine-tunes the parts after it (the prompt path's trainable parts, the implicit decoder and the
  box-proposal head) on the cached embeddings, with the bundle's loss: the method without its encoder
  adapters (the ``lora_rank 0, fa_mode none`` variant), at a fraction of the cost, which is what makes a
  many-round, many-seed study fit on a CPU.

Both start every round from the same network (the bundle's initial one: the pretrained ``lite_medsam``, or
random init for ``vit_tiny``) and train with the tight boxes of the ground truth.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from imedsam.data import polyp_datalist
from imedsam.engine import parameter_groups
from imedsam.losses import CoarseFineLoss, coarse_weight_at
from imedsam.metrics import dice
from imedsam.networks import IMedSAM, ImageEncoding
from imedsam.networks.coordinates import stratified_lines

__all__ = ["BundleRunner", "EmbeddingRunner", "image_extent", "write_split"]


def image_extent(path: str, image_size: int) -> tuple[float, float]:
    """``(fy, fx)``: the part of the ``image_size`` square that the image at ``path`` fills once its longest
    side is resized to ``image_size`` (the bundle's framing)."""
    with Image.open(path) as image:
        width, height = image.size
    scale = image_size / max(height, width)
    return round(height * scale) / image_size, round(width * scale) / image_size


def write_split(split: dict[str, list[str]], run_dir: str) -> str:
    """Write a round's split as ``run_dir/split.json`` (the folder made if missing); its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "split.json")
    with open(path, "w") as f:
        json.dump(split, f, indent=1)
    return path


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
        split_file = write_split(split, run_dir)
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
        size = int(self.overrides.get("image_size", 256))
        return [{**transform(dict(item)), "name": item["name"], "extent": image_extent(item["image"], size)} for item in datalist]


class EmbeddingRunner(BundleRunner):
    """Fine-tune the parts after a frozen encoder on embeddings computed once per image, in this process.

    The network is the bundle's (``network_def`` of ``train.yaml`` with ``overrides``), and must have no
    trainable encoder part: pass ``lora_rank=0``, ``fa_mode="none"`` and ``freeze_sam=True``. Each :meth:`train` starts again from
    that network's initial weights (for ``lite_medsam``, LiteMedSAM's), draws batches of labeled images with
    the bundle's loss (:class:`~imedsam.losses.CoarseFineLoss`, the coarse weight decaying over the first half
    of the steps, the box-proposal term included), AdamW with a linear decay, a fresh ``query_size``
    sub-lattice of the ``train_label_size`` grid per step, and the tight box jittered outwards by up to
    ``box_jitter`` pixels. No augmentation of the image: the embedding is cached. Checkpoints hold only
    the trained parts (and the head's counter), on top of the initial network.

    :meth:`evaluate` decodes the test split (and every image of ``cross_domain_dir`` when given) at
    ``label_size`` in the bundle's evaluation frame and writes ``eval/per_image.csv`` and
    ``eval/summary.json`` as ``evaluate.yaml`` does.
    """

    def __init__(
        self,
        bundle_dir: str,
        dataset_dir: str,
        overrides: dict | None = None,
        cross_domain_dir: str | None = None,
        train_label_size: int = 128,
        query_size: int = 64,
        box_jitter: int = 5,
    ) -> None:
        super().__init__(bundle_dir, dataset_dir, dict(overrides or {}))
        self.cross_domain_dir = cross_domain_dir
        self.train_label_size = train_label_size
        self.query_size = query_size
        self.box_jitter = box_jitter
        self.network: IMedSAM = self._parser().get_parsed_content("network_init", lazy=False)
        trainable_encoder = [n for n, p in self.network.image_encoder.named_parameters() if p.requires_grad]
        if trainable_encoder:
            raise ValueError(
                f"EmbeddingRunner caches the encoder's output, so the encoder must be frozen; {len(trainable_encoder)} "
                f"of its parameters train (e.g. {trainable_encoder[0]}): pass lora_rank=0, fa_mode='none' and freeze_sam=True"
            )
        self.trained_keys = {n for n, p in self.network.named_parameters() if p.requires_grad}
        if self.network.box_proposal is not None:
            self.trained_keys.add("box_proposal.trained_steps")
        self.initial_state = {k: v.clone() for k, v in self.network.state_dict().items() if k in self.trained_keys}
        self.items: dict[str, dict] = {}

    def preprocess(self, datalist: Sequence[dict]) -> list[dict]:
        """The bundle's validation transforms, then the encoder once per image (kept as ``embedding``)."""
        missing = [item for item in datalist if item["name"] not in self.items]
        self.network.eval()
        for item in super().preprocess(missing):
            with torch.no_grad():
                item["embedding"] = self.network.encode(item.pop("image").unsqueeze(0).float()).embedding[0]
            label = item["label"].float().reshape(1, 1, *item["label"].shape[-2:])
            small = torch.nn.functional.interpolate(label, size=(self.train_label_size,) * 2, mode="area")
            item["train_label"] = (small[0] >= 0.5).float()
            self.items[item["name"]] = item
        return [self.items[item["name"]] for item in datalist]

    def load_network(self, checkpoint: str) -> IMedSAM:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state, strict=False)
        return self.network

    def train(self, split: dict[str, list[str]], run_dir: str, steps: int, seed: int) -> tuple[str, float]:
        """Fine-tune for ``steps`` steps on ``split["train"]`` from the initial network; no validation
        (the last model is the one evaluated), so the second value is NaN."""
        os.makedirs(run_dir, exist_ok=True)
        items = self.preprocess(polyp_datalist(self.dataset_dir, "train", write_split(split, run_dir), check_files=False))
        network = self.network
        network.load_state_dict(self.initial_state, strict=False)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        batch_size = int(self.overrides.get("batch_size", 2))
        learning_rate = float(self.overrides.get("learning_rate", 2e-4))
        optimizer = torch.optim.AdamW(parameter_groups(network, learning_rate, float(self.overrides.get("encoder_lr_scale", 0.25))), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, total_iters=steps)
        loss_function = CoarseFineLoss()
        size = network.image_size
        order: list[int] = []
        network.train()
        for step in range(steps):
            if len(order) < batch_size:
                order += list(rng.permutation(len(items)))
            batch = [items[order.pop(0)] for _ in range(min(batch_size, len(items)))]
            embedding = torch.stack([item["embedding"] for item in batch])
            boxes = torch.stack([item["box"].reshape(4).float() for item in batch])
            jitter = torch.from_numpy(rng.integers(0, self.box_jitter + 1, size=boxes.shape)).float()
            boxes = torch.stack([boxes[:, 0] - jitter[:, 0], boxes[:, 1] - jitter[:, 1], boxes[:, 2] + jitter[:, 2], boxes[:, 3] + jitter[:, 3]], 1).clamp(0, size)
            target = torch.stack([item["train_label"] for item in batch])
            lines = tuple(stratified_lines(self.train_label_size, self.query_size, "cpu") for _ in range(2))
            loss_function.coarse_weight = coarse_weight_at(step, decay_epochs=max(1, steps // 2))
            out = network.decode_all(ImageEncoding(embedding, size, size), boxes.unsqueeze(1), (self.train_label_size,) * 2, query_lines=lines)
            if network.box_proposal is not None:
                out = out._replace(proposal_logits=network.box_proposal(embedding))
            loss = loss_function(out, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        network.eval()
        checkpoint = os.path.join(run_dir, "models", "model.pt")
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        torch.save({k: v for k, v in network.state_dict().items() if k in self.trained_keys}, checkpoint)
        return checkpoint, float("nan")

    @torch.no_grad()
    def _dice(self, items: Sequence[dict]) -> list[float]:
        size = int(self.overrides.get("label_size", 256))
        network = self.network.eval()
        scores = []
        for item in items:
            encoding = ImageEncoding(item["embedding"].unsqueeze(0), network.image_size, network.image_size)
            logits = network.decode(encoding, item["box"].reshape(1, 1, 4).float(), (size, size))[0, 0]
            scores.append(dice(logits > 0, item["label"].reshape(size, size) > 0.5))
        return scores

    def evaluate(self, checkpoint: str, split_file: str, run_dir: str) -> dict:
        """Dice of the checkpoint on the test split (``dice``) and on ``cross_domain_dir`` (``cross_dice``)."""
        self.load_network(checkpoint)
        sets = {"dice": polyp_datalist(self.dataset_dir, "test", split_file, check_files=False)}
        if self.cross_domain_dir:
            sets["cross_dice"] = [{**item, "name": "cross:" + item["name"]} for item in polyp_datalist(self.cross_domain_dir, "all", check_files=False)]
        os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
        summary, rows = {}, []
        for key, datalist in sets.items():
            scores = self._dice(self.preprocess(datalist))
            summary[key] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "count": len(scores)}
            rows += [{"name": item["name"], "dice": value} for item, value in zip(datalist, scores)]
        with open(os.path.join(run_dir, "eval", "per_image.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=("name", "dice"))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(run_dir, "eval", "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary
