"""Implicit segmentation decoder with uncertainty-guided sampling (UGS): the module and its exact mode.

The method as the paper states it is :func:`~imedsam.networks.implicit.reference.reference_decode`; this
decoder computes the same maths fast and with bounded memory, from the pieces beside it: each call follows one
:class:`~imedsam.networks.implicit.plan.DecodePlan`, the first layers are lookup tables
(:mod:`~imedsam.networks.implicit.first_layer_table`), the later layers are in
:mod:`~imedsam.networks.implicit.layers`, the per-class heads under MC dropout in
:mod:`~imedsam.networks.implicit.heads`, and the adaptive mode in :mod:`~imedsam.networks.implicit.adaptive`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..precision import PRECISIONS, resolve_precision
from ..validation import check_query_lines
from .adaptive import adaptive_levels, decode_adaptive
from .coordinates import fourier_encoding_dim, pixel_centres
from .fine import refine
from .first_layer_table import (
    DenseTapsCache,
    FirstLayerTable,
    ImageRowsCache,
    build_first_layer_table,
    evaluate_table,
    sample_mask_prior,
    table_taps,
)
from .heads import coarse_logit, logit_variance, with_mask_prior
from .layers import FineHead, INRTrunk, rows_through
from .plan import DecodePlan, DropoutDraw, ImplicitDecoderOutput

__all__ = ["ImplicitDecoderOutput", "ImplicitSegmentationDecoder"]


class ImplicitSegmentationDecoder(nn.Module):
    """Coarse INR, MC-dropout uncertainty, top-K selection per prompt, fine INR, merge.

    Every query point ``p`` in (-1, 1)^2 gets the input ``[box map(p), image embedding(p), gamma(p)]``:
    bilinear samples of SAM's box-conditioned map and of the image embedding, and the Fourier encoding of
    ``p``. The coarse INR maps it to a logit and ``coarse_feature_dim`` features; T dropout passes of its
    head give a per-point variance; the ``ugs_top_k`` fraction of points with the highest variance, chosen
    per prompt, is re-predicted by the fine INR from the same input plus the coarse features.

    With ``mask_prior`` (the warm start on a pretrained SAM) the decoder refines SAM's own mask logit: that
    logit is one more channel of the box map, both INRs predict a correction added to its value at the
    point, and their output layers start at zero, so the untrained decoder reproduces SAM's mask. Its MC
    passes drop channels of SAM's mask head (rate ``prior_dropout``) as well as the coarse trunk's output,
    and the uncertainty is the variance of the probability: it is informative before any training, high
    where the passes disagree about the side of the boundary and near zero deep inside or outside.

    At inference the T dropout masks are fixed sub-networks drawn from ``mc_seed`` and shared by all points, so
    the output is deterministic and traceable and its variance is not zero; in training they are drawn afresh
    at every call (:meth:`plan`). How it stays fast and bounded, with the maths unchanged: ``docs/speed.md``,
    "What makes it fast".

    Args:
        box_channels: channels of the box-conditioned map (SAM: 32).
        image_channels: channels of the image embedding (SAM: 256).
        num_frequencies: L of gamma(p).
        coarse_widths: hidden widths of the coarse trunk.
        coarse_feature_dim: features passed from the coarse to the fine INR.
        fine_widths: hidden widths of the fine trunk.
        fine_head_width: hidden width of the fine head.
        dropout: MC-dropout probability.
        ugs_top_k: fraction of points refined per prompt; 0 turns UGS and the fine INR off.
        mc_samples: dropout passes at inference; mc_samples_train: in training (both at least 2).
        num_classes: number of per-class heads; a prompt's class picks its coarse and fine head.
        chunk_size: points decoded at once (over all prompts) at inference.
        mc_seed: seed of the inference dropout masks.
        precision: ``"auto"`` (bfloat16 where the hardware runs it natively, else float32: see
            :mod:`~imedsam.networks.precision`), ``"float32"`` or ``"bfloat16"``, for the trunks' matmuls at
            inference.
        adaptive_coarse_size: largest side of the first grid of ``mode="adaptive"``.
        adaptive_points: points per prompt evaluated at the output's level of ``mode="adaptive"``, halved at
            each coarser level (its Dice against exact decoding: ``docs/speed.md``).
        mask_prior: refine SAM's mask logit (``forward`` then needs ``mask_weights``); False is the paper's
            plain decoder.
        prior_dropout: dropout probability over SAM's mask-head channels in the MC passes.

    Shapes: ``box_features [P, box_channels, hb, wb]``, ``image_features [P, image_channels, g, g]``,
    ``class_ids [P]``; outputs ``[P, H, W]`` (see :class:`ImplicitDecoderOutput`).

    Example::

        >>> decoder = ImplicitSegmentationDecoder(mc_samples=4).eval()
        >>> out = decoder(torch.randn(2, 32, 16, 16), torch.randn(2, 256, 4, 4), (20, 30))
        >>> out.logits.shape, out.refined_index.shape
        (torch.Size([2, 20, 30]), torch.Size([2, 75]))
    """

    #: training draws this many trunk-output masks per call and gives each point one of them
    train_dropout_pool = 64

    def __init__(
        self,
        box_channels: int = 32,
        image_channels: int = 256,
        num_frequencies: int = 10,
        coarse_widths: tuple[int, int] = (1024, 512),
        coarse_feature_dim: int = 256,
        fine_widths: tuple[int, int] = (256, 256),
        fine_head_width: int = 128,
        dropout: float = 0.5,
        ugs_top_k: float = 0.125,
        mc_samples: int = 8,
        mc_samples_train: int = 2,
        num_classes: int = 1,
        chunk_size: int = 8192,
        mc_seed: int = 0,
        precision: str = "auto",
        adaptive_coarse_size: int = 64,
        adaptive_points: int = 4096,
        mask_prior: bool = False,
        prior_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if adaptive_coarse_size < 1 or adaptive_points < 1:
            raise ValueError(f"adaptive_coarse_size and adaptive_points must be positive, got {adaptive_coarse_size}, {adaptive_points}")
        if not 0.0 <= ugs_top_k <= 1.0:
            raise ValueError(f"ugs_top_k is a fraction of points in [0, 1], got {ugs_top_k}")
        if min(mc_samples, mc_samples_train) < 2:
            raise ValueError(f"MC dropout needs at least 2 passes, got mc_samples={mc_samples}, mc_samples_train={mc_samples_train}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {dropout}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 < prior_dropout < 1.0:
            raise ValueError(f"prior_dropout must be in (0, 1), got {prior_dropout}")
        self.mask_prior = mask_prior
        self.prior_dropout = prior_dropout
        # with a mask prior SAM's mask logit is one more channel of the box map
        self.box_channels = box_channels + int(mask_prior)
        self.image_channels = image_channels
        self.num_frequencies = num_frequencies
        self.ugs_top_k = ugs_top_k
        self.mc_samples_train = mc_samples_train
        self.chunk_size = chunk_size
        self.precision = precision
        self.adaptive_coarse_size = adaptive_coarse_size
        self.adaptive_points = adaptive_points
        self.dropout_p = dropout
        # columns of the first layers: [box map | image embedding | gamma(p)] (+ coarse features for the fine INR)
        self.point_dim = point_dim = self.box_channels + image_channels + fourier_encoding_dim(num_frequencies)
        hidden, width = coarse_widths

        self.coarse_input = nn.Linear(point_dim, hidden)
        self.coarse_trunk = INRTrunk(hidden, width)
        # per class: row 0 the logit, rows 1.. the features handed to the fine INR
        self.coarse_heads = nn.ModuleList([nn.Linear(width, 1 + coarse_feature_dim) for _ in range(num_classes)])
        self.fine_input = nn.Linear(point_dim + coarse_feature_dim, fine_widths[0])
        self.fine_trunk = INRTrunk(fine_widths[0], fine_widths[1])
        self.fine_heads = nn.ModuleList([FineHead(fine_widths[1], fine_head_width) for _ in range(num_classes)])
        generator = torch.Generator().manual_seed(mc_seed)
        keep = (torch.rand(mc_samples, width, generator=generator) >= dropout).float() / (1.0 - dropout)
        self.register_buffer("mc_masks", keep, persistent=False)
        prior_keep = (torch.rand(mc_samples, box_channels, generator=generator) >= prior_dropout).float() / (1.0 - prior_dropout)
        self.register_buffer("prior_mc_masks", prior_keep, persistent=False)
        if mask_prior:
            # Corrections to SAM's logit start at zero: the untrained decoder predicts exactly what SAM does.
            for head in self.coarse_heads:
                nn.init.zeros_(head.weight[:1])
                nn.init.zeros_(head.bias[:1])
            for head in self.fine_heads:
                nn.init.zeros_(head.output.weight)
                nn.init.zeros_(head.output.bias)
        self.dense_taps = DenseTapsCache()
        self.image_rows = ImageRowsCache()

    @property
    def num_classes(self) -> int:
        return len(self.coarse_heads)

    def train(self, mode: bool = True) -> ImplicitSegmentationDecoder:
        """With a mask prior the BatchNorms stay in eval mode (their running statistics, frozen at the
        identity, act as a learned affine): fine-tuning sees batches of one or two images, whose
        statistics differ from image to image, and a decoder that leans on them mispredicts at inference."""
        super().train(mode)
        if self.mask_prior:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self

    def num_refined(self, num_points: int) -> int:
        return 0 if self.ugs_top_k == 0 else max(1, int(round(self.ugs_top_k * num_points)))

    # -- the plan of a call -------------------------------------------------------------------------------
    def plan(self, mode: str, prompts: int, query_points: int, device: torch.device, dtype: torch.dtype) -> DecodePlan:
        """The :class:`DecodePlan` of a call with ``prompts`` prompts on a grid of ``query_points`` points.

        In training all of the call's dropout masks are drawn here, once: a pool of trunk-output masks with
        one assigned to each point (a point's logit and its features use the same mask, as one dropout
        layer before the head would), the first T of them as the MC passes, and the mask-head channel masks.
        """
        width = self.mc_masks.shape[1]
        if not self.training:
            compute = torch.bfloat16 if resolve_precision(self.precision, device) == "bfloat16" else dtype
            draw = DropoutDraw(None, None, self.mc_masks, self.prior_mc_masks if self.mask_prior else None)
            return DecodePlan(False, mode, compute, max(1, self.chunk_size // prompts), draw)
        keep = 1.0 - self.dropout_p
        pool = (torch.rand(self.train_dropout_pool, width, device=device) >= self.dropout_p).float() / keep
        assignment = torch.randint(0, self.train_dropout_pool, (prompts, query_points), device=device)
        prior = None
        if self.mask_prior:
            channels = self.prior_mc_masks.shape[1]
            keep_prior = 1.0 - self.prior_dropout
            prior = (torch.rand(self.mc_samples_train, channels, device=device) >= self.prior_dropout).float() / keep_prior
        # BatchNorm with batch statistics: every point in one batch
        return DecodePlan(True, "exact", dtype, None, DropoutDraw(pool, assignment, pool[: self.mc_samples_train], prior))

    # -- first layers -------------------------------------------------------------------------------------
    def first_layer_table(
        self, layer: nn.Linear, trunk: INRTrunk, plan: DecodePlan, box_features, image_features, ys, xs,
        pixel_grid: bool = True, extent: tuple[float, float] = (1.0, 1.0), mask_prior: torch.Tensor | None = None,
        points: int | None = None, image_rows: torch.Tensor | None = None,
    ) -> FirstLayerTable:  # fmt: skip
        """``layer`` on the grid of rows ``ys`` and columns ``xs``, with ``trunk``'s input BatchNorm folded in
        at inference. ``points``: how many points per prompt the table will serve (None: unknown); with fewer
        than the box map has pixels, the table keeps the map rather than write a row for each of its pixels.
        ``image_rows``: those of a table of the same layer and maps on another grid, reused; at inference
        they are otherwise kept for the same embedding's next call (:class:`ImageRowsCache`)."""
        fold = None if plan.training else trunk.input_fold()
        box_rows = points is None or points >= box_features.shape[-2] * box_features.shape[-1]
        if image_rows is None and not plan.training:
            norm = trunk.input_norm
            image_rows = self.image_rows(
                layer, fold, (*norm.parameters(), *norm.buffers()), self.box_channels, self.image_channels,
                image_features, plan.dtype,
            )  # fmt: skip
        return build_first_layer_table(
            layer, self.box_channels, self.image_channels, self.num_frequencies, box_features, image_features, ys, xs,
            fold, plan.dtype, pixel_grid, extent, mask_prior, box_rows, image_rows,
        )  # fmt: skip

    def first_layer(self, table: FirstLayerTable, index: torch.Tensor | None = None, dense: slice | None = None):
        """First-layer outputs ``[P, N, C]`` at raster ``index [P, N]`` of the table's grid, or at the
        ``dense`` slice of every prompt's whole grid, and the mask prior ``[P, N, 1 + T]`` (or None) there."""
        if dense is not None:
            taps, weights = self.dense_taps(table)
            taps, weights = taps[:, dense], weights[:, dense]
        else:
            taps, weights = table_taps(table, index)
        return evaluate_table(table, taps, weights), sample_mask_prior(table, taps, weights)

    def trunk_runner(self, trunk: INRTrunk, plan: DecodePlan):
        """``first-layer output -> trunk output``: the plain trunk in training, the folded one at inference."""
        return (lambda first: rows_through(trunk, first)) if plan.training else trunk.folded(plan.dtype)

    # -- the two INRs on a grid -------------------------------------------------------------------------------
    def coarse_at(self, plan: DecodePlan, table: FirstLayerTable, index, class_ids, keep_trunk: bool):
        """Coarse logits and MC variance ``[P, N]`` at raster ``index [P, N]`` (None: the whole grid), in the
        plan's chunks; with ``keep_trunk`` and a single chunk, also the trunk output for the refined points."""
        num = table.height * table.width if index is None else index.shape[1]
        step = num if plan.chunk_points is None else plan.chunk_points
        run_trunk = self.trunk_runner(self.coarse_trunk, plan)
        logits, variances = [], []
        for start in range(0, num, step):
            if index is None:
                first, prior = self.first_layer(table, dense=slice(start, start + step))
            else:
                first, prior = self.first_layer(table, index[:, start : start + step])
            trunk = run_trunk(first)
            assignment = None if plan.dropout.assignment is None else plan.dropout.assignment[:, start : start + step]
            logit = coarse_logit(self.coarse_heads, plan, trunk, class_ids, assignment)
            logits.append(logit if prior is None else logit + prior[..., 0])
            variances.append(logit_variance(self.coarse_heads, plan, trunk, class_ids, prior))
        # One chunk: its trunk serves the refined points. Several: they are recomputed rather than all kept.
        kept = trunk if (keep_trunk and step >= num) else None
        return torch.cat(logits, dim=1), torch.cat(variances, dim=1), kept

    # -- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        box_features: torch.Tensor,
        image_features: torch.Tensor,
        output_size: tuple[int, int],
        class_ids: torch.Tensor | None = None,
        mode: str = "exact",
        query_lines: tuple[torch.Tensor, torch.Tensor] | None = None,
        extent: tuple[float, float] = (1.0, 1.0),
        mask_weights: torch.Tensor | None = None,
    ) -> ImplicitDecoderOutput:
        """Decode every prompt on an ``output_size`` grid; ``mode`` is ``"exact"`` or ``"adaptive"`` (inference
        only; training always decodes exactly).

        ``query_lines = (rows [h], columns [w])``, integer indices of rows and columns of the output grid,
        decodes only the ``h x w`` sub-lattice they span (exact mode): outputs are then ``[P, h, w]``, and UGS
        refines its fraction of those points. Training uses it to see every part of a full-resolution
        mask at a fraction of the points (see :func:`~imedsam.networks.implicit.coordinates.stratified_lines`).

        ``extent = (fy, fx)``: the output covers the top-left ``fy x fx`` fraction of both maps (a letterboxed
        image, whose padding is not decoded). ``mask_weights [P, box_channels]`` (with ``mask_prior``): the
        weights of SAM's mask head, whose dot product with the box map is SAM's mask logit; see the class.
        """
        if mode not in ("exact", "adaptive"):
            raise ValueError(f"mode must be 'exact' or 'adaptive', got {mode!r}")
        if (mask_weights is None) == self.mask_prior:
            raise ValueError(
                "this decoder refines SAM's mask logit: pass mask_weights" if self.mask_prior
                else "mask_weights given to a decoder built with mask_prior=False"
            )  # fmt: skip
        extent = (float(extent[0]), float(extent[1]))
        prompts, device = box_features.shape[0], box_features.device
        height, width = int(output_size[0]), int(output_size[1])
        if class_ids is None:
            class_ids = torch.zeros(prompts, dtype=torch.long, device=device)
        if query_lines is None:
            ys, xs = pixel_centres(height, device), pixel_centres(width, device)
        else:
            if mode == "adaptive" and not self.training:
                raise ValueError("query_lines decode a given sub-lattice exactly; they cannot be combined with mode='adaptive'")
            rows, columns = check_query_lines(query_lines, height, width)
            ys, xs = pixel_centres(height, device)[rows.to(device)], pixel_centres(width, device)[columns.to(device)]
            height, width = rows.numel(), columns.numel()
        plan = self.plan(mode, prompts, height * width, device, box_features.dtype)
        box_features, prior = with_mask_prior(plan, box_features, mask_weights)
        if plan.mode == "adaptive":
            levels = adaptive_levels((height, width), self.adaptive_coarse_size)
            if levels > 0:
                return decode_adaptive(self, plan, box_features, image_features, (height, width), class_ids, levels, extent, prior)
        table = self.first_layer_table(
            self.coarse_input, self.coarse_trunk, plan, box_features, image_features, ys, xs, query_lines is None, extent, prior,
            points=height * width,
        )
        coarse, variance, kept = self.coarse_at(plan, table, None, class_ids, keep_trunk=True)
        shape = (prompts, height, width)
        k = self.num_refined(height * width)
        if k == 0:
            return ImplicitDecoderOutput(coarse.view(shape), coarse.view(shape), variance.view(shape), None)
        refined_index = torch.topk(variance, k, dim=1).indices
        fine = refine(self, plan, box_features, image_features, refined_index, class_ids, table, kept)
        final = coarse.scatter(1, refined_index, fine)
        return ImplicitDecoderOutput(final.view(shape), coarse.view(shape), variance.view(shape), refined_index)
