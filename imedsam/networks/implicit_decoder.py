"""Implicit segmentation decoder with uncertainty-guided sampling (UGS)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .coordinates import bilinear_taps, fourier_encoding, fourier_encoding_dim, pixel_centres
from .validation import check_query_lines

__all__ = ["ImplicitDecoderOutput", "ImplicitSegmentationDecoder"]


class _FirstLayerTable(NamedTuple):
    values: torch.Tensor  # [rows, C]: box-map rows of every prompt, image-map rows, grid columns, grid rows
    box_size: tuple[int, int]
    image_size: tuple[int, int]
    ys: torch.Tensor  # [height] normalised y of the query grid's rows
    xs: torch.Tensor  # [width] normalised x of its columns
    prompts: int
    pixel_grid: bool  # the rows and columns are all the pixel centres of an output (its taps can be cached)
    extent: tuple[float, float] = (1.0, 1.0)  # (height, width) fraction of the maps that the output covers
    base: torch.Tensor | None = None  # [P * hb * wb, 1 + T]: SAM's mask logit and its T dropout passes

    @property
    def height(self) -> int:
        return self.ys.shape[0]

    @property
    def width(self) -> int:
        return self.xs.shape[0]


class ImplicitDecoderOutput(NamedTuple):
    """Per-prompt decoder outputs on an ``H x W`` query grid (``P`` prompts, ``K`` refined points each).

    The query grid is the output grid, or the sub-lattice of its rows and columns given as ``query_lines``.
    """

    logits: torch.Tensor  #: ``[P, H, W]`` coarse logits with the refined points replaced by fine logits
    coarse_logits: torch.Tensor  #: ``[P, H, W]``
    uncertainty: torch.Tensor  #: ``[P, H, W]`` MC-dropout variance (of the logit; of the probability with a mask prior)
    refined_index: torch.Tensor | None  #: ``[P, K]`` raster indices refined by the fine INR, None when UGS is off


def _mlp_block(width_in: int, width_out: int) -> list[nn.Module]:
    return [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]


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

    How it stays fast and bounded (the maths is that of the plain description above):

    * the first linear layer of each INR is applied before sampling: to the two feature maps, and to the
      Fourier encoding of every grid column and every grid row (gamma is separable in x and y), so a
      point's first-layer output is one ``embedding_bag`` sum of ten table rows; bilinear weights sum to
      one, so this is exact;
    * dropout acts on the trunk output, so the T passes share the trunk and repeat only the logit row of
      the head, and the coarse features are computed only at the refined points;
    * at inference the T dropout masks are fixed sub-networks drawn from ``mc_seed`` (shared by all
      points), so the output is deterministic, traceable and its variance is not zero; in training the
      masks are drawn afresh at every call;
    * in eval mode the BatchNorms are folded into the layers before them, and query points are decoded in
      chunks of ``chunk_size``; the trunk is recomputed at the refined points instead of being kept for
      every pixel; ``precision="bfloat16"`` runs the trunks' matmuls in bfloat16 (heads and variance stay
      float32);
    * ``mode="adaptive"`` (eval) decodes a grid coarser by a power of two (at most ``adaptive_coarse_size``
      on a side) and, at each finer level up to the output, only the ``adaptive_points`` points nearest
      the predicted boundary; the fine INR re-predicts those of the last level. Its cost grows with the
      boundary's length, not with the output's area;
    * ``query_lines`` decodes only a sub-lattice of the output's rows and columns: training on a random one
      each step costs what a coarser grid costs, while the loss still reads the mask at full resolution.

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
        chunk_size: points decoded at once (over all prompts) in eval mode.
        mc_seed: seed of the inference dropout masks.
        precision: ``"float32"`` or ``"bfloat16"`` for the trunks' matmuls in eval mode.
        adaptive_coarse_size: largest side of the first grid of ``mode="adaptive"``.
        adaptive_points: points per prompt evaluated at each finer level of ``mode="adaptive"``.
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
        precision: str = "float32",
        adaptive_coarse_size: int = 128,
        adaptive_points: int = 8192,
        mask_prior: bool = False,
        prior_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
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
        self.train_dropout_pool = 64
        # columns of the first layers: [box map | image embedding | gamma(p)] (+ coarse features for the fine INR)
        self.point_dim = point_dim = self.box_channels + image_channels + fourier_encoding_dim(num_frequencies)
        hidden, width = coarse_widths

        self.coarse_input = nn.Linear(point_dim, hidden)
        self.coarse_trunk = nn.Sequential(nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), *_mlp_block(hidden, width))
        self.coarse_heads = nn.ModuleList([nn.Linear(width, 1 + coarse_feature_dim) for _ in range(num_classes)])
        self.dropout = nn.Dropout(dropout)
        self.fine_input = nn.Linear(point_dim + coarse_feature_dim, fine_widths[0])
        self.fine_trunk = nn.Sequential(
            nn.BatchNorm1d(fine_widths[0]), nn.ReLU(inplace=True), *_mlp_block(fine_widths[0], fine_widths[1])
        )
        self.fine_heads = nn.ModuleList(
            [nn.Sequential(*_mlp_block(fine_widths[1], fine_head_width), nn.Linear(fine_head_width, 1)) for _ in range(num_classes)]
        )
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
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
        self._dense_taps_cache: dict = {}

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

    # -- first layers, as one embedding table ------------------------------------------------------------
    def _first_layer_table(
        self, layer: nn.Linear, box_features, image_features, ys: torch.Tensor, xs: torch.Tensor, fold=None, dtype=None,
        pixel_grid: bool = True, extent: tuple[float, float] = (1.0, 1.0), base: torch.Tensor | None = None,
    ):  # fmt: skip
        """The first layer of an INR on the query grid of rows at ``ys`` and columns at ``xs`` (normalised
        coordinates), as rows of one table.

        Its map parts are applied to the maps (channel-last), its coordinate part to every grid column and
        every grid row: gamma(p) is a concatenation of functions of x alone and of y alone, so
        ``W gamma(x, y) = W gamma(x, 0) - W gamma(0, 0) + W gamma(0, y)``. A point's first-layer output is
        then the sum of 4 bilinear box-map rows, 4 image-map rows, its column row and its row row, which one
        ``embedding_bag`` call computes (see :meth:`_first_layer`). ``fold = (scale, shift)`` folds an eval
        BatchNorm that follows the layer into the table.
        """
        weight = layer.weight
        box_w = weight[:, : self.box_channels]
        image_w = weight[:, self.box_channels : self.box_channels + self.image_channels]
        coord_w = weight[:, self.box_channels + self.image_channels : self.point_dim]
        box_map = F.linear(box_features.permute(0, 2, 3, 1), box_w, layer.bias)
        image_map = F.linear(image_features.permute(0, 2, 3, 1), image_w)
        origin = F.linear(fourier_encoding(xs.new_zeros(1, 2), self.num_frequencies), coord_w)
        columns = F.linear(fourier_encoding(torch.stack([xs, torch.zeros_like(xs)], -1), self.num_frequencies), coord_w) - origin
        rows = F.linear(fourier_encoding(torch.stack([torch.zeros_like(ys), ys], -1), self.num_frequencies), coord_w)
        parts = [box_map.reshape(-1, box_map.shape[-1]), image_map.reshape(-1, image_map.shape[-1]), columns, rows]
        if fold is not None:
            scale, shift = fold
            parts = [part * scale for part in parts]
            parts[0] = parts[0] + shift  # every point takes box rows with weights summing to one
        values = torch.cat(parts)
        return _FirstLayerTable(
            values if dtype is None else values.to(dtype),
            tuple(box_features.shape[-2:]),
            tuple(image_features.shape[-2:]),
            ys,
            xs,
            box_features.shape[0],
            pixel_grid,
            extent,
            base,
        )

    @staticmethod
    def _taps(table: _FirstLayerTable, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows ``[P, N, 10]`` and weights of the points at raster ``index [P, N]``."""
        prompts = index.shape[0]
        grid_row = torch.div(index, table.width, rounding_mode="floor")
        grid_column = index - grid_row * table.width
        coords = torch.stack([table.xs[grid_column], table.ys[grid_row]], dim=-1)
        if table.extent != (1.0, 1.0):  # the output covers the top-left part of padded maps
            coords = (coords + 1) * coords.new_tensor([table.extent[1], table.extent[0]]) - 1
        (bh, bw), (ih, iw) = table.box_size, table.image_size
        box_rows, box_weights = bilinear_taps(bh, bw, coords)
        image_rows, image_weights = bilinear_taps(ih, iw, coords)
        prompt = torch.arange(prompts, device=index.device).view(prompts, 1, 1)
        box_rows = box_rows + prompt * (bh * bw)
        image_rows = image_rows + prompt * (ih * iw) + prompts * bh * bw
        line_start = prompts * (bh * bw + ih * iw)
        columns = (grid_column + line_start).unsqueeze(-1)
        lines = (grid_row + line_start + table.width).unsqueeze(-1)
        taps = torch.cat([box_rows, image_rows, columns, lines], dim=-1)
        weights = torch.cat([box_weights, image_weights, box_weights.new_ones(*index.shape, 2)], dim=-1)
        return taps, weights.to(table.values.dtype)

    def _dense_taps(self, table: _FirstLayerTable, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_taps` of the whole grid, kept for the next call when it is an output's pixel grid: they
        depend only on the sizes, so re-prompting at the same output size skips computing them."""
        if not table.pixel_grid:  # a training sub-lattice, drawn afresh at every step
            index = torch.arange(table.height * table.width, device=table.values.device).expand(prompts, -1)
            return self._taps(table, index)
        key = (table.height, table.width, tuple(table.box_size), tuple(table.image_size), prompts,
               table.values.device, table.values.dtype, table.extent)  # fmt: skip
        if key not in self._dense_taps_cache:
            self._dense_taps_cache.clear()  # one entry: an 896 x 896 grid's taps take about 100 MB
            index = torch.arange(table.height * table.width, device=table.values.device).expand(prompts, -1)
            self._dense_taps_cache[key] = self._taps(table, index)
        return self._dense_taps_cache[key]

    def _first_layer(self, table: _FirstLayerTable, index: torch.Tensor | None = None, dense: slice | None = None) -> torch.Tensor:
        """First-layer outputs ``[P, N, C]`` at raster ``index [P, N]`` of the table's grid, or at the
        ``dense`` slice of every prompt's whole grid."""
        return self._first_layer_and_base(table, index, dense)[0]

    def _first_layer_and_base(self, table: _FirstLayerTable, index=None, dense=None):
        """:meth:`_first_layer` and, when the table has a mask prior, its samples ``[P, N, 1 + T]`` at the
        same points (SAM's logit, then its dropout passes), from the same box-map taps."""
        if dense is not None:
            taps, weights = self._dense_taps(table, table.prompts)
            taps, weights = taps[:, dense], weights[:, dense]
        else:
            taps, weights = self._taps(table, index)
        out = F.embedding_bag(
            taps.reshape(-1, taps.shape[-1]), table.values, per_sample_weights=weights.reshape(-1, weights.shape[-1]), mode="sum"
        )
        out = out.view(taps.shape[0], -1, out.shape[-1])
        return out, self._sample_base(table, taps, weights)

    @staticmethod
    def _sample_base(table: _FirstLayerTable, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The mask prior ``[P, N, 1 + T]`` at the points of ``taps``: its first four are the box-map taps, and
        the prior is a box-map channel, so it is sampled like one."""
        if table.base is None:
            return None
        base = F.embedding_bag(
            taps[..., :4].reshape(-1, 4), table.base, per_sample_weights=weights[..., :4].reshape(-1, 4).float(), mode="sum"
        )
        return base.view(taps.shape[0], -1, base.shape[-1])

    @staticmethod
    def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm1d wants [rows, channels]
        return module(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    # -- per-class heads --------------------------------------------------------------------------------
    def _per_class(self, fn, x: torch.Tensor, class_ids: torch.Tensor, out_dim: int) -> torch.Tensor:
        if self.num_classes == 1:
            return fn(0, x)
        out = x.new_zeros(*x.shape[:-1], out_dim)
        for cls in torch.unique(class_ids).tolist():
            rows = class_ids == cls
            out[rows] = fn(cls, x[rows])
        return out

    def _coarse_logit(self, trunk: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        def head(cls, h):
            layer = self.coarse_heads[cls]
            weight, bias = layer.weight[:1].to(h.dtype), layer.bias[:1].to(h.dtype)
            if not self.training:
                return F.linear(h, weight, bias).float()
            # Dropout on the trunk output, every point with its own mask drawn from a pool of masks drawn
            # afresh at each step: (mask * h) . w = h . (mask * w), so the masks act on the weight row and
            # the [points, width] mask that elementwise dropout draws (its RNG alone costs ~0.3 s for a
            # 384 x 384 grid) is never made.
            masks = (torch.rand(self.train_dropout_pool, h.shape[-1], device=h.device) >= self.dropout_p).to(h.dtype)
            per_mask = F.linear(h, masks * weight / (1.0 - self.dropout_p), bias)  # [..., pool]
            choice = torch.randint(0, self.train_dropout_pool, (*h.shape[:-1], 1), device=h.device)
            return per_mask.gather(-1, choice)

        return self._per_class(head, trunk, class_ids, 1).squeeze(-1)

    def _dropout_masks(self, samples: int, width: int, device, fixed: torch.Tensor) -> torch.Tensor:
        """Inverted-dropout keep masks ``[T, width]``: drawn afresh in training, the fixed ones at inference."""
        if not self.training:
            return fixed
        return (torch.rand(samples, width, device=device) >= self.dropout_p).float() / (1.0 - self.dropout_p)

    def _logit_variance(self, trunk: torch.Tensor, class_ids: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """MC-dropout variance per point: of the coarse logit, or with a mask prior (``base [P, N, 1 + T]``,
        SAM's logit and its T dropout passes) of the probability ``sigmoid(base_t + correction_t)``."""
        masks = self._dropout_masks(self.mc_samples_train, trunk.shape[-1], trunk.device, self.mc_masks).to(trunk.dtype)
        if base is None:

            def head(cls, h):
                # logit of pass t = (mask_t * h) . w + b; the bias does not change the variance
                return F.linear(h.detach(), (self.coarse_heads[cls].weight[:1] * masks).to(h.dtype)).float()

            return self._per_class(head, trunk, class_ids, masks.shape[0]).var(dim=-1)

        def corrected(cls, h):
            layer = self.coarse_heads[cls]
            return F.linear(h.detach(), (layer.weight[:1] * masks).to(h.dtype), layer.bias[:1].to(h.dtype)).float()

        passes = self._per_class(corrected, trunk, class_ids, masks.shape[0]) + base[..., 1:].detach()
        return torch.sigmoid(passes).var(dim=-1)

    def _coarse_features(self, trunk: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        def head(cls, h):
            layer = self.coarse_heads[cls]
            return F.linear(self.dropout(h), layer.weight[1:].to(h.dtype), layer.bias[1:].to(h.dtype)).float()

        return self._per_class(head, trunk, class_ids, self.coarse_heads[0].out_features - 1)

    def _fine_logit(self, hidden: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self._per_class(lambda cls, h: self._rows(self.fine_heads[cls], h), hidden, class_ids, 1).squeeze(-1)

    # -- trunks: BatchNorm with batch statistics in training, folded into the weights in eval -------------
    @staticmethod
    def _batch_norm_affine(norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale

    def _trunk_runner(self, trunk: nn.Sequential, dtype):
        """``first-layer output -> trunk output`` for a trunk ``[BN, ReLU, Linear, BN, ReLU]``.

        In eval the first BatchNorm is folded into the first-layer table (:meth:`_first_layer_table`) and
        the second into the linear layer, so the trunk is two in-place ReLUs around one matmul, in ``dtype``.
        """
        if self.training:
            return lambda first: self._rows(trunk, first)
        linear = trunk[2]
        scale, shift = self._batch_norm_affine(trunk[3])
        weight = (linear.weight * scale.unsqueeze(-1)).to(dtype)
        bias = (linear.bias * scale + shift).to(dtype)
        return lambda first: F.relu_(F.linear(F.relu_(first), weight, bias))

    def _fold(self, trunk: nn.Sequential):
        return None if self.training else self._batch_norm_affine(trunk[0])

    def _compute_dtype(self, reference: torch.Tensor) -> torch.dtype:
        return torch.bfloat16 if (self.precision == "bfloat16" and not self.training) else reference.dtype

    # -- forward ----------------------------------------------------------------------------------------
    def num_refined(self, num_points: int) -> int:
        return 0 if self.ugs_top_k == 0 else max(1, int(round(self.ugs_top_k * num_points)))

    def _coarse_at(self, table, index, class_ids, run_trunk, keep_trunk: bool):
        """Coarse logits and MC variance ``[P, N]`` at raster ``index [P, N]`` (None: the whole grid), in
        chunks in eval mode."""
        prompts = table.prompts
        num = table.height * table.width if index is None else index.shape[1]
        # BatchNorm in training normalises with batch statistics: all points must go through at once.
        step = num if self.training else max(1, self.chunk_size // prompts)
        logits, variances = [], []
        for start in range(0, num, step):
            if index is None:
                first, base = self._first_layer_and_base(table, dense=slice(start, start + step))
            else:
                first, base = self._first_layer_and_base(table, index[:, start : start + step])
            trunk = run_trunk(first)
            logit = self._coarse_logit(trunk, class_ids)
            logits.append(logit if base is None else logit + base[..., 0])
            variances.append(self._logit_variance(trunk, class_ids, base))
        # One chunk: its trunk serves the refined points. Several: they are recomputed rather than all kept.
        kept = trunk if (keep_trunk and step >= num) else None
        return torch.cat(logits, dim=1), torch.cat(variances, dim=1), kept

    def _refine(
        self, box_features, image_features, index, class_ids, coarse_table, run_coarse, kept_trunk, dtype, kept_positions=None
    ):
        """Fine logits ``[P, K]`` at raster ``index [P, K]`` of the query grid of ``coarse_table``.

        The coarse trunk there is taken from ``kept_trunk`` (rows at ``kept_positions``, by default the
        raster indices themselves) or recomputed when nothing was kept.
        """
        if kept_positions is None:
            kept_positions = index
        prompts = index.shape[0]
        fold = self._fold(self.fine_trunk)
        fine_table = self._first_layer_table(
            self.fine_input, box_features, image_features, coarse_table.ys, coarse_table.xs, fold, dtype,
            coarse_table.pixel_grid, coarse_table.extent,
        )  # fmt: skip
        feature_w = self.fine_input.weight[:, self.point_dim :]
        if fold is not None:
            feature_w = feature_w * fold[0].unsqueeze(-1)
        run_fine = self._trunk_runner(self.fine_trunk, dtype)
        step = index.shape[1] if kept_trunk is not None else max(1, self.chunk_size // prompts)
        fine_logits = []
        for start in range(0, index.shape[1], step):
            part = index[:, start : start + step]
            if kept_trunk is not None:
                rows = kept_positions[:, start : start + step]
                trunk = kept_trunk.gather(1, rows.unsqueeze(-1).expand(-1, -1, kept_trunk.shape[-1]))
            else:
                trunk = run_coarse(self._first_layer(coarse_table, part))
            features = self._coarse_features(trunk, class_ids)
            hidden = self._first_layer(fine_table, part) + F.linear(features, feature_w).to(fine_table.values.dtype)
            hidden = run_fine(hidden).float()
            fine_logit = self._fine_logit(hidden, class_ids)
            if coarse_table.base is not None:
                fine_logit = fine_logit + self._sample_base(coarse_table, *self._taps(coarse_table, part))[..., 0]
            fine_logits.append(fine_logit)
        return torch.cat(fine_logits, dim=1)

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
        """Decode every prompt on an ``output_size`` grid; ``mode`` is ``"exact"`` or ``"adaptive"`` (eval only).

        ``query_lines = (rows [h], columns [w])``, integer indices of rows and columns of the output grid,
        decodes only the ``h x w`` sub-lattice they span (exact mode): outputs are then ``[P, h, w]``, and UGS
        refines its fraction of those points. Training uses it to see every part of a full-resolution
        mask at a fraction of the points (see :func:`~imedsam.networks.coordinates.stratified_lines`).

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
        box_features, base = self._mask_prior(box_features, mask_weights)
        prompts = box_features.shape[0]
        height, width = int(output_size[0]), int(output_size[1])
        if class_ids is None:
            class_ids = torch.zeros(prompts, dtype=torch.long, device=box_features.device)
        device = box_features.device
        if query_lines is None:
            ys, xs = pixel_centres(height, device), pixel_centres(width, device)
        else:
            if mode == "adaptive" and not self.training:
                raise ValueError("query_lines decode a given sub-lattice exactly; they cannot be combined with mode='adaptive'")
            rows, columns = check_query_lines(query_lines, height, width)
            ys, xs = pixel_centres(height, device)[rows.to(device)], pixel_centres(width, device)[columns.to(device)]
            height, width = rows.numel(), columns.numel()
        if mode == "adaptive" and not self.training:
            levels = max(0, math.ceil(math.log2(max(height, width) / self.adaptive_coarse_size)))
            if levels > 0:
                return self._forward_adaptive(box_features, image_features, (height, width), class_ids, levels, extent, base)
        dtype = self._compute_dtype(box_features)
        table = self._first_layer_table(
            self.coarse_input, box_features, image_features, ys, xs, self._fold(self.coarse_trunk), dtype, query_lines is None,
            extent, base,
        )  # fmt: skip
        run_coarse = self._trunk_runner(self.coarse_trunk, dtype)
        num_points = height * width
        coarse, variance, kept = self._coarse_at(table, None, class_ids, run_coarse, keep_trunk=True)
        shape = (prompts, height, width)
        k = self.num_refined(num_points)
        if k == 0:
            return ImplicitDecoderOutput(coarse.view(shape), coarse.view(shape), variance.view(shape), None)
        refined_index = torch.topk(variance, k, dim=1).indices
        fine = self._refine(box_features, image_features, refined_index, class_ids, table, run_coarse, kept, dtype)
        final = coarse.scatter(1, refined_index, fine)
        return ImplicitDecoderOutput(final.view(shape), coarse.view(shape), variance.view(shape), refined_index)

    def _mask_prior(self, box_features: torch.Tensor, mask_weights: torch.Tensor | None):
        """With a mask prior: the box map with SAM's mask logit appended as a channel, and the base table
        ``[P * hb * wb, 1 + T]`` of that logit and of its T dropout passes over the mask head's channels."""
        if mask_weights is None:
            return box_features, None
        weighted = mask_weights[:, :, None, None] * box_features
        logit = weighted.sum(dim=1, keepdim=True)
        if self.training:
            draws = torch.rand(self.mc_samples_train, box_features.shape[1], device=box_features.device)
            keep = (draws >= self.prior_dropout).float() / (1.0 - self.prior_dropout)
        else:
            keep = self.prior_mc_masks
        passes = torch.einsum("tc,pchw->pthw", keep.to(weighted.dtype), weighted.detach())
        base = torch.cat([logit, passes], dim=1).permute(0, 2, 3, 1)
        return torch.cat([box_features, logit], dim=1), base.reshape(-1, base.shape[-1])

    def _forward_adaptive(
        self, box_features, image_features, output_size, class_ids, levels: int, extent=(1.0, 1.0), base=None
    ) -> ImplicitDecoderOutput:
        """Coarse INR on a grid ``2**levels`` times coarser, then at each finer level only at the points
        nearest the predicted boundary (smallest ``|logit|``); the fine INR re-predicts those of the last
        level. Everywhere else the logit and its variance are bilinear from the level below."""
        prompts = box_features.shape[0]
        height, width = output_size
        dtype = self._compute_dtype(box_features)
        run_coarse = self._trunk_runner(self.coarse_trunk, dtype)
        fold = self._fold(self.coarse_trunk)

        def level_size(level: int) -> tuple[int, int]:
            factor = 2 ** (levels - level)
            return math.ceil(height / factor), math.ceil(width / factor)

        def level_table(size: tuple[int, int]) -> _FirstLayerTable:
            ys, xs = (pixel_centres(n, box_features.device) for n in size)
            return self._first_layer_table(self.coarse_input, box_features, image_features, ys, xs, fold, dtype, True, extent, base)

        size = level_size(0)
        table = level_table(size)
        coarse, variance, _ = self._coarse_at(table, None, class_ids, run_coarse, keep_trunk=False)
        for level in range(1, levels + 1):
            previous, size = size, level_size(level)
            coarse, variance = (
                F.interpolate(x.view(prompts, 1, *previous), size=size, mode="bilinear", align_corners=False).view(prompts, -1)
                for x in (coarse, variance)
            )
            table = level_table(size)
            points = min(self.adaptive_points, size[0] * size[1])
            index = torch.topk(-coarse.abs(), points, dim=1).indices
            at_points, variance_at_points, kept = self._coarse_at(table, index, class_ids, run_coarse, keep_trunk=True)
            coarse = coarse.scatter(1, index, at_points)
            variance = variance.scatter(1, index, variance_at_points)
        shape = (prompts, height, width)
        if self.ugs_top_k == 0:
            return ImplicitDecoderOutput(coarse.view(shape), coarse.view(shape), variance.view(shape), None)
        # the kept trunk rows are in the order of ``index``
        positions = torch.arange(index.shape[1], device=index.device).expand(prompts, -1)
        fine = self._refine(
            box_features, image_features, index, class_ids, table, run_coarse, kept, dtype, kept_positions=positions
        )
        final = coarse.scatter(1, index, fine)
        return ImplicitDecoderOutput(final.view(shape), coarse.view(shape), variance.view(shape), index)
