"""Implicit segmentation decoder with uncertainty-guided sampling (UGS)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .coordinates import bilinear_sample, fourier_encoding, fourier_encoding_dim, pixel_centre_grid

__all__ = ["ImplicitDecoderOutput", "ImplicitSegmentationDecoder"]


class ImplicitDecoderOutput(NamedTuple):
    """Per-prompt decoder outputs on an ``H x W`` query grid (``P`` prompts, ``K`` refined points each)."""

    logits: torch.Tensor  #: ``[P, H, W]`` coarse logits with the refined points replaced by fine logits
    coarse_logits: torch.Tensor  #: ``[P, H, W]``
    uncertainty: torch.Tensor  #: ``[P, H, W]`` MC-dropout variance of the coarse logit
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

    How it stays fast and bounded (the maths is that of the plain description above):

    * the first linear layer of each INR is split by input; its map parts are applied to the feature maps
      before sampling, which is exact because bilinear weights sum to one;
    * dropout acts on the trunk output, so the T passes share the trunk and repeat only the logit row of
      the head, and the coarse features are computed only at the refined points;
    * at inference the T dropout masks are fixed sub-networks drawn from ``mc_seed`` (shared by all
      points), so the output is deterministic, traceable and its variance is not zero; in training the
      masks are drawn afresh at every call;
    * in eval mode query points are decoded in chunks of ``chunk_size`` (BatchNorm then uses its running
      statistics, so chunking changes nothing), and the trunk is recomputed at the refined points instead
      of being kept for every pixel.

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
        chunk_size: int = 2048,
        mc_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ugs_top_k <= 1.0:
            raise ValueError(f"ugs_top_k is a fraction of points in [0, 1], got {ugs_top_k}")
        if min(mc_samples, mc_samples_train) < 2:
            raise ValueError(f"MC dropout needs at least 2 passes, got mc_samples={mc_samples}, mc_samples_train={mc_samples_train}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {dropout}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.box_channels = box_channels
        self.image_channels = image_channels
        self.num_frequencies = num_frequencies
        self.ugs_top_k = ugs_top_k
        self.mc_samples_train = mc_samples_train
        self.chunk_size = chunk_size
        self.dropout_p = dropout
        # columns of the first layers: [box map | image embedding | gamma(p)] (+ coarse features for the fine INR)
        self.point_dim = point_dim = box_channels + image_channels + fourier_encoding_dim(num_frequencies)
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

    @property
    def num_classes(self) -> int:
        return len(self.coarse_heads)

    # -- first layers, split by input -------------------------------------------------------------------
    def _project(self, layer: nn.Linear, box_features: torch.Tensor, image_features: torch.Tensor):
        """Apply the map parts of a first layer to the maps (channel-last) and return the coordinate part."""
        weight = layer.weight
        box_w = weight[:, : self.box_channels]
        image_w = weight[:, self.box_channels : self.box_channels + self.image_channels]
        coord_w = weight[:, self.box_channels + self.image_channels : self.point_dim]
        box_map = F.linear(box_features.permute(0, 2, 3, 1), box_w, layer.bias)
        image_map = F.linear(image_features.permute(0, 2, 3, 1), image_w)
        return box_map, image_map, coord_w

    def _first_layer(self, projected, coords: torch.Tensor) -> torch.Tensor:
        box_map, image_map, coord_w = projected
        encoded = fourier_encoding(coords, self.num_frequencies)
        return bilinear_sample(box_map, coords) + bilinear_sample(image_map, coords) + F.linear(encoded, coord_w)

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
            return F.linear(self.dropout(h), layer.weight[:1], layer.bias[:1])

        return self._per_class(head, trunk, class_ids, 1).squeeze(-1)

    def _logit_variance(self, trunk: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            masks = (torch.rand(self.mc_samples_train, trunk.shape[-1], device=trunk.device) >= self.dropout_p).to(trunk.dtype)
            masks = masks / (1.0 - self.dropout_p)
        else:
            masks = self.mc_masks.to(trunk.dtype)

        def head(cls, h):
            # logit of pass t = (mask_t * h) . w + b; the bias does not change the variance
            return F.linear(h.detach(), self.coarse_heads[cls].weight[:1] * masks)

        return self._per_class(head, trunk, class_ids, masks.shape[0]).var(dim=-1)

    def _coarse_features(self, trunk: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        def head(cls, h):
            layer = self.coarse_heads[cls]
            return F.linear(self.dropout(h), layer.weight[1:], layer.bias[1:])

        return self._per_class(head, trunk, class_ids, self.coarse_heads[0].out_features - 1)

    def _fine_logit(self, hidden: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        return self._per_class(lambda cls, h: self._rows(self.fine_heads[cls], h), hidden, class_ids, 1).squeeze(-1)

    # -- forward ----------------------------------------------------------------------------------------
    def num_refined(self, num_points: int) -> int:
        return 0 if self.ugs_top_k == 0 else max(1, int(round(self.ugs_top_k * num_points)))

    def forward(
        self,
        box_features: torch.Tensor,
        image_features: torch.Tensor,
        output_size: tuple[int, int],
        class_ids: torch.Tensor | None = None,
    ) -> ImplicitDecoderOutput:
        prompts = box_features.shape[0]
        height, width = int(output_size[0]), int(output_size[1])
        num_points = height * width
        if class_ids is None:
            class_ids = torch.zeros(prompts, dtype=torch.long, device=box_features.device)
        grid = pixel_centre_grid(height, width, device=box_features.device)
        coarse_proj = self._project(self.coarse_input, box_features, image_features)

        def trunk_at(coords: torch.Tensor) -> torch.Tensor:
            return self._rows(self.coarse_trunk, self._first_layer(coarse_proj, coords))

        # BatchNorm in training normalises with batch statistics: all points must go through at once.
        step = num_points if self.training else max(1, self.chunk_size // prompts)
        logits, variances = [], []
        for start in range(0, num_points, step):
            coords = grid[start : start + step].unsqueeze(0).expand(prompts, -1, -1)
            trunk = trunk_at(coords)
            logits.append(self._coarse_logit(trunk, class_ids))
            variances.append(self._logit_variance(trunk, class_ids))
        coarse = torch.cat(logits, dim=1)
        variance = torch.cat(variances, dim=1)
        # One chunk: its trunk serves the refined points. Several: recompute there rather than keep them all.
        kept_trunk = trunk if step >= num_points else None

        k = self.num_refined(num_points)
        if k == 0:
            shape = (prompts, height, width)
            return ImplicitDecoderOutput(coarse.view(shape), coarse.view(shape), variance.view(shape), None)

        refined_index = torch.topk(variance, k, dim=1).indices
        fine_proj = self._project(self.fine_input, box_features, image_features)
        coarse_feature_w = self.fine_input.weight[:, self.point_dim :]
        fine_step = k if kept_trunk is not None else max(1, self.chunk_size // prompts)
        fine_logits = []
        for start in range(0, k, fine_step):
            index = refined_index[:, start : start + fine_step]
            coords = grid[index]
            if kept_trunk is not None:
                trunk = kept_trunk.gather(1, index.unsqueeze(-1).expand(-1, -1, kept_trunk.shape[-1]))
            else:
                trunk = trunk_at(coords)
            features = self._coarse_features(trunk, class_ids)
            hidden = self._first_layer(fine_proj, coords) + F.linear(features, coarse_feature_w)
            hidden = self._rows(self.fine_trunk, hidden)
            fine_logits.append(self._fine_logit(hidden, class_ids))
        final = coarse.scatter(1, refined_index, torch.cat(fine_logits, dim=1))
        shape = (prompts, height, width)
        return ImplicitDecoderOutput(final.view(shape), coarse.view(shape), variance.view(shape), refined_index)
