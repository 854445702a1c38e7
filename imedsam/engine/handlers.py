"""Ignite handlers: the coarse-weight schedule, evaluation reports and saved predictions."""

from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from ..losses import coarse_weight_at
from ..metrics import METRIC_NAMES, binary_metrics, summarize_metrics
from ..visualize import heat_map, overlay

__all__ = ["CoarseWeightHandler", "EvaluationReport", "SavePredictions"]

logger = logging.getLogger(__name__)


class CoarseWeightHandler:
    """Set ``loss.coarse_weight`` at the start of every epoch from :func:`~imedsam.losses.coarse_weight_at`."""

    def __init__(self, loss, start: float = 0.8, end: float = 0.0, decay_epochs: int = 4) -> None:
        self.loss, self.start, self.end, self.decay_epochs = loss, start, end, decay_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.loss.coarse_weight = coarse_weight_at(engine.state.epoch - 1, self.start, self.end, self.decay_epochs)
        engine.logger.info("epoch %d: coarse loss weight %.2f", engine.state.epoch, self.loss.coarse_weight)


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _image_hwc(image) -> np.ndarray:
    array = _as_numpy(image)
    return (np.clip(array.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)


class EvaluationReport:
    """Per-image Dice, IoU, HD95 and Boundary IoU of the binarised prediction, written at the end of a run.

    Writes ``output_dir/per_image.csv`` (one row per image) and ``output_dir/summary.json`` (mean and std of
    each metric, the count, and ``label_size``), and logs the means. The first ``overlays`` images are also
    drawn to ``output_dir/overlays/NAME.png``: image, ground-truth contour (green), prediction (blue), box
    (yellow) and, when the prediction carries it, the uncertainty heat map.

    Expects decollated outputs with ``pred`` (binary ``[1, H, W]``; with uncertainty ``[2, H, W]``, channel 1
    the map) and ``label`` (``[1, H, W]``), and batch items with ``name``, ``image`` and ``box``. Items of a
    multi-organ datalist also carry ``class``: the CSV then has a ``class`` column and the summary a
    ``per_class`` entry (count and mean of each metric per organ).
    """

    def __init__(self, output_dir: str, overlays: int = 0, label_size: int | None = None) -> None:
        self.output_dir = output_dir
        self.overlays = overlays
        self.label_size = label_size
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        for batch_item, output in zip(engine.state.batch, engine.state.output):
            name = batch_item.get("name", f"image_{len(self.rows)}")
            pred = _as_numpy(output["pred"])
            label = _as_numpy(output["label"])[0] > 0.5
            mask = pred[0] > 0.5
            row = {"name": name, **binary_metrics(mask, label)}
            if "class" in batch_item:
                row["class"] = batch_item["class"]
            self.rows.append(row)
            if len(self.rows) <= self.overlays:
                self._draw(name, batch_item, mask, label, pred[1] if pred.shape[0] > 1 else None)

    def _draw(self, name, batch_item, mask, label, uncertainty) -> None:
        image = _image_hwc(batch_item["image"])
        size = mask.shape
        if image.shape[:2] != size:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        box = _as_numpy(batch_item["box"]).reshape(-1, 4)[0]
        image_h, image_w = _as_numpy(batch_item["image"]).shape[-2:]
        box = box * np.array([size[1] / image_w, size[0] / image_h] * 2)
        folder = os.path.join(self.output_dir, "overlays")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(overlay(image, mask, box, target=label, uncertainty=uncertainty)).save(os.path.join(folder, f"{name}.png"))

    def summary(self) -> dict:
        out = {"count": len(self.rows), "label_size": self.label_size, **summarize_metrics(self.rows)}
        classes = sorted({row["class"] for row in self.rows if "class" in row})
        if classes:
            out["per_class"] = {}
            for name in classes:
                rows = [row for row in self.rows if row.get("class") == name]
                out["per_class"][name] = {"count": len(rows), **summarize_metrics(rows)}
        return out

    def completed(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "per_image.csv"), "w", newline="") as f:
            has_class = any("class" in row for row in self.rows)
            writer = csv.DictWriter(f, fieldnames=["name", *(["class"] if has_class else []), *METRIC_NAMES])
            writer.writeheader()
            writer.writerows(self.rows)
        summary = self.summary()
        with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.rows:
            logger.info(
                "evaluated %d images at label size %s: Dice %.4f ± %.4f, IoU %.4f, HD95 %.2f, Boundary IoU %.4f -> %s",
                summary["count"], self.label_size, summary["dice"]["mean"], summary["dice"]["std"],
                summary["iou"]["mean"], summary["hd95"]["mean"], summary["boundary_iou"]["mean"], self.output_dir,
            )


class SavePredictions:
    """Save each image's mask (``masks/NAME.png``, 0/255), uncertainty (``uncertainty/NAME.npy`` float32 and a
    heat map ``uncertainty/NAME.png``) and an overlay (``overlays/NAME.png``) under ``output_dir``.

    Expects decollated outputs whose ``pred`` is ``[2N, H, W]``: N binarised masks then N uncertainty maps
    (:class:`~imedsam.engine.PromptInferer` with ``with_uncertainty=True``), or, with
    ``with_uncertainty=False`` (SAM's mask decoder, ``use_inr=False``), ``[N, H, W]`` masks only, and then no
    uncertainty files. With several boxes per image the saved mask is their union, the uncertainty their
    maximum and the overlay draws every box; the ``.npy`` keeps every box's map.
    """

    def __init__(self, output_dir: str, with_uncertainty: bool = True) -> None:
        self.output_dir = output_dir
        self.with_uncertainty = with_uncertainty
        self.saved = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(
            Events.COMPLETED, lambda _: logger.info("saved predictions for %d images to %s", self.saved, self.output_dir)
        )

    def __call__(self, engine: Engine) -> None:
        for sub in ("masks", "overlays") + (("uncertainty",) if self.with_uncertainty else ()):
            os.makedirs(os.path.join(self.output_dir, sub), exist_ok=True)
        for batch_item, output in zip(engine.state.batch, engine.state.output):
            name = batch_item["name"]
            pred = _as_numpy(output["pred"])
            boxes = _as_numpy(batch_item["box"]).reshape(-1, 4)
            masks_count = pred.shape[0] // 2 if self.with_uncertainty else pred.shape[0]
            if masks_count != len(boxes):
                raise ValueError(
                    f"{name}: the prediction has {pred.shape[0]} channels for {len(boxes)} boxes; "
                    f"with_uncertainty={self.with_uncertainty} must match the inferer's"
                )
            union = (pred[:masks_count] > 0.5).any(axis=0)
            Image.fromarray(union.astype(np.uint8) * 255).save(os.path.join(self.output_dir, "masks", f"{name}.png"))
            most_uncertain = None
            if self.with_uncertainty:
                uncertainty = pred[masks_count:].astype(np.float32)
                most_uncertain = uncertainty.max(axis=0)
                np.save(os.path.join(self.output_dir, "uncertainty", f"{name}.npy"), uncertainty)
                Image.fromarray(heat_map(most_uncertain)).save(os.path.join(self.output_dir, "uncertainty", f"{name}.png"))
            picture = overlay(_image_hwc(batch_item["image"]), union, boxes, uncertainty=most_uncertain)
            Image.fromarray(picture).save(os.path.join(self.output_dir, "overlays", f"{name}.png"))
            self.saved += 1
