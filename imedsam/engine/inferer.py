"""Inferer that hands prompts (and an output size) to I-MedSAM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer

from imedsam.networks.coordinates import stratified_lines
from imedsam.networks.prompts.prompts import Prompts, as_prompts

__all__ = ["PromptInferer"]


class PromptInferer(Inferer):
    """Call I-MedSAM with the prompts that ``PrepareBatchExtraInput`` takes from the batch.

    Args:
        output_size: ``(H, W)`` of the decoded map; None decodes at the input image's size.
        return_all: return the whole :class:`~imedsam.networks.IMedSAMOutput` (training: the loss needs the
            coarse logits too).
        with_uncertainty: return ``[B, 2N, H, W]``, the N logits followed by the N uncertainty maps.
        query_size: with ``return_all`` (training), decode at each call a fresh random ``query_size x
            query_size`` sub-lattice of the output grid, one row and one column of every stratum
            (:func:`~imedsam.networks.coordinates.stratified_lines`); the output carries its lines so that
            :class:`~imedsam.losses.CoarseFineLoss` reads the full-resolution target there. None, or the
            output grid's size: every pixel.
        click_prob: for a batch that carries clicks beside its boxes (``points`` and ``point_labels``, from
            :class:`~imedsam.transforms.ClicksFromMaskd`), the chance that the batch is prompted by its clicks
            instead of its boxes, drawn once per call with torch's generator (seeded by MONAI's
            ``set_determinism``): training for both kinds of prompt. 0: boxes only; 1: clicks only.

    Called as ``inferer(images, network, boxes=..., output_size=...)`` with ``boxes [B, N, 4]`` (what the
    bundle's ``extra_keys={'boxes': 'box'}`` passes) and optionally ``modality=`` one name per image (``extra_keys``
    ``'modality': 'modality'``), or with ``prompts=`` a :class:`~imedsam.networks.Prompts`; either reaches the
    network as a ``Prompts``. ``slab_depth=D`` (what :class:`~imedsam.engine.PrepareSlabBatch` passes): the images
    are slabs of ``D`` consecutive slices, for a network with volumetric adapters. An ``output_size`` given in the
    call (a ``[B, 2]`` tensor from the batch, all rows equal) wins over the constructor's.
    """

    def __init__(
        self,
        output_size: Sequence[int] | None = None,
        return_all: bool = False,
        with_uncertainty: bool = False,
        query_size: int | None = None,
        click_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= click_prob <= 1.0:
            raise ValueError(f"click_prob must be a probability in [0, 1], got {click_prob}")
        self.click_prob = float(click_prob)
        if return_all and with_uncertainty:
            raise ValueError("return_all already includes the uncertainty; pass only one of the two")
        if query_size is not None and not return_all:
            raise ValueError("query_size needs return_all=True: the loss must know which rows and columns were decoded")
        if query_size is not None and query_size < 1:
            raise ValueError(f"query_size must be a positive number of rows and columns, got {query_size}")
        self.query_size = query_size
        self.output_size = None if output_size is None else tuple(int(v) for v in output_size)
        self.return_all = return_all
        self.with_uncertainty = with_uncertainty

    def _query_lines(self, size, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A fresh sub-lattice of the ``size`` output grid, or None for every pixel."""
        height, width = size
        if self.query_size is None or self.query_size == height == width:
            return None
        if self.query_size > min(height, width):
            raise ValueError(f"query_size {self.query_size} exceeds the output grid {height} x {width}")
        return tuple(stratified_lines(n, self.query_size, device) for n in (height, width))

    def __call__(
        self, inputs: torch.Tensor, network, boxes: torch.Tensor | None = None, output_size=None,
        prompts: Prompts | None = None, modality=None, slab_depth: int = 1,
        points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None, **kwargs,
    ):  # fmt: skip
        if points is not None and prompts is None:
            if boxes is None or (self.click_prob > 0 and torch.rand(()) < self.click_prob):
                boxes = None
                prompts = Prompts(points=points, point_labels=point_labels, modality=modality)
                modality = None
        if (boxes is None) == (prompts is None):
            raise ValueError(
                "PromptInferer needs boxes or prompts (one of the two): set prepare_batch to "
                "PrepareBatchExtraInput(extra_keys={'boxes': 'box'})"
            )
        if modality is not None and prompts is not None:
            raise ValueError("give the modality inside prompts (Prompts(modality=...)), not beside them")
        prompts = as_prompts(prompts if boxes is None else Prompts(boxes=boxes, modality=modality), inputs.device)
        size = self.output_size
        if output_size is not None:
            sizes = torch.as_tensor(output_size).reshape(-1, 2)
            if not (sizes == sizes[0]).all():
                raise ValueError(f"images of one batch must share the output size, got {sizes.tolist()}; use batch_size 1")
            size = tuple(int(v) for v in sizes[0])
        # slabs of neighbouring slices (PrepareSlabBatch) reach the network's encoder together; plain images alone
        slabs = {} if slab_depth == 1 else {"slab_depth": slab_depth}
        if self.return_all:
            lines = self._query_lines(size or inputs.shape[-2:], inputs.device)
            return network(inputs, prompts, size, return_all=True, query_lines=lines, **slabs)
        if not self.with_uncertainty:
            return network(inputs, prompts, size, **slabs)
        out = network(inputs, prompts, size, return_all=True, **slabs)
        if out.uncertainty is None:
            raise ValueError(
                "with_uncertainty=True, but this network returns no uncertainty map: SAM's mask decoder "
                "(use_inr=False) has none; set with_uncertainty to False (in the bundle: it follows @use_inr)"
            )
        return torch.cat([out.logits, out.uncertainty], dim=1)
