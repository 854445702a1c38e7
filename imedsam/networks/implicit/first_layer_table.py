"""The implicit decoder's first layer as one lookup table: the fast exact evaluation of ``W [maps(p), gamma(p)]``.

An INR's first layer sees, at a query point ``p``, ``[box map(p), image embedding(p), gamma(p)]``: bilinear
samples of two feature maps and the Fourier encoding of ``p``. Both parts are linear in what the layer reads:

* a bilinear sample is a weighted sum of four map pixels whose weights sum to one, so the layer can be
  applied to the maps first and the results blended afterwards;
* gamma is a concatenation of functions of x alone and of y alone, so
  ``W gamma(x, y) = W gamma(x, 0) - W gamma(0, 0) + W gamma(0, y)``: the layer applied to every grid column
  and to every grid row.

A point's first-layer output is then a weighted sum of ten table rows (4 box-map rows, 4 image-map rows,
its column's row and its row's row), which one ``embedding_bag`` call computes for a whole chunk of points.
An eval-mode BatchNorm after the layer folds into the table as a scale of every row and a shift of the
box-map rows (a point's box-map weights sum to one, so it takes the shift exactly once).

The box map is large (SAM's is 256 x 256) and changes with every prompt. When fewer points are evaluated
than it has pixels (the finer levels of the adaptive mode, the UGS refinement, a training sub-lattice), its
rows are not written: the map itself is kept, its four taps are blended into the point's box-map input, and
the layer is applied to that (``W (sum_i w_i m_i) = sum_i w_i (W m_i)``, the same maths in another order).
Such a table's rows are then the image-map rows alone, the very tensor :class:`ImageRowsCache` keeps (no copy
of 16 MB per adaptive level), and ``gamma(p)`` and the bias join the box-map input in that one matmul: a
point's input is ``[box map blend, gamma(x, 0) - gamma(0, 0) + gamma(0, y), 1]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .coordinates import bilinear_taps, fourier_encoding

__all__ = [
    "FirstLayerTable",
    "DenseTapsCache",
    "ImageRowsCache",
    "build_first_layer_table",
    "evaluate_table",
    "folded_layer",
    "image_map_rows",
    "sample_mask_prior",
    "table_taps",
]

class FirstLayerTable(NamedTuple):
    """One INR's first layer on one query grid, as the rows of a table (see the module's docstring)."""

    #: ``[rows, C]``: box-map rows of every prompt, image-map rows, grid columns, grid rows; with ``box_map``
    #: the image-map rows alone
    values: torch.Tensor
    box_size: tuple[int, int]  #: ``(hb, wb)`` of the box map
    image_size: tuple[int, int]  #: ``(g, g)`` of the image embedding
    ys: torch.Tensor  #: ``[height]`` normalised y of the query grid's rows
    xs: torch.Tensor  #: ``[width]`` normalised x of its columns
    prompts: int
    pixel_grid: bool  #: the rows and columns are all the pixel centres of an output (its taps can be cached)
    extent: tuple[float, float] = (1.0, 1.0)  #: (height, width) fraction of the maps that the output covers
    mask_prior: torch.Tensor | None = None  #: ``[P * hb * wb, 1 + T]``: SAM's mask logit and its T dropout passes
    #: ``[P * hb * wb, box_channels]`` the box map itself, when its rows are not in ``values`` (see the module)
    box_map: torch.Tensor | None = None
    #: with ``box_map``: ``[box_channels + coordinate_dim + 1, C]``, the layer's box-map and gamma columns and its
    #: bias, applied to a point's ``[box map blend, gamma, 1]``
    point_weight: torch.Tensor | None = None
    column_codes: torch.Tensor | None = None  #: with ``box_map``: ``[width, coordinate_dim]``, gamma(x, 0) - gamma(0, 0)
    row_codes: torch.Tensor | None = None  #: with ``box_map``: ``[height, coordinate_dim]``, gamma(0, y)

    @property
    def height(self) -> int:
        return self.ys.shape[0]

    @property
    def width(self) -> int:
        return self.xs.shape[0]

    @property
    def image_rows(self) -> torch.Tensor:
        """``[P * g * g, C]``: the image-map rows, which another grid's table of the same layer and maps can
        reuse (``build_first_layer_table(..., image_rows=...)``)."""
        if self.box_map is not None:
            return self.values
        start = self.prompts * self.box_size[0] * self.box_size[1]
        return self.values[start : start + self.prompts * self.image_size[0] * self.image_size[1]]


def folded_layer(layer: nn.Linear, fold: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``layer`` followed by the affine ``fold = (scale, shift)`` (None: the layer's own)."""
    if fold is None:
        return layer.weight, layer.bias
    # scale the layer instead of every table row: one pass over the table fewer for each of scale and shift
    scale, shift = fold
    return layer.weight * scale.unsqueeze(1), shift if layer.bias is None else layer.bias * scale + shift


def image_map_rows(
    weight: torch.Tensor, box_channels: int, image_channels: int, image_features: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """The image-map rows ``[P * g * g, C]`` of a first layer of ``weight`` (folded), as its table holds them."""
    dtype = dtype or image_features.dtype
    image_map = image_features.permute(0, 2, 3, 1).reshape(-1, image_channels)
    return torch.mm(image_map.to(dtype), weight[:, box_channels : box_channels + image_channels].t().to(dtype))


def build_first_layer_table(
    layer: nn.Linear,
    box_channels: int,
    image_channels: int,
    num_frequencies: int,
    box_features: torch.Tensor,
    image_features: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    fold: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    pixel_grid: bool = True,
    extent: tuple[float, float] = (1.0, 1.0),
    mask_prior: torch.Tensor | None = None,
    box_rows: bool = True,
    image_rows: torch.Tensor | None = None,
) -> FirstLayerTable:
    """``layer`` (columns ``[box map | image embedding | gamma(p) | anything after]``) on the grid of rows at
    ``ys`` and columns at ``xs`` (normalised coordinates).

    Args:
        box_features: ``[P, box_channels, hb, wb]``; image_features: ``[P, image_channels, g, g]``.
        fold: ``(scale, shift)`` of an eval BatchNorm that follows the layer, folded into the table.
        dtype: the table's dtype (the trunk's compute precision); None keeps the maps'.
        pixel_grid, extent, mask_prior: stored with the table, see :class:`FirstLayerTable`.
        box_rows: write the layer's output at every box-map pixel into the table; False keeps the box map
            and applies the layer to its blend at each point instead (cheaper for fewer points than pixels).
        image_rows: :attr:`FirstLayerTable.image_rows` of a table of the same layer, fold, dtype and maps on
            another grid, rather than computed again: held as they are when the box map is kept, else copied
            into the table.
    """
    weight, bias = folded_layer(layer, fold)
    coordinates_end = box_channels + image_channels + 2 * (2 * num_frequencies + 1)
    box_w = weight[:, :box_channels]
    image_w = weight[:, box_channels : box_channels + image_channels]
    coord_w = weight[:, box_channels + image_channels : coordinates_end]
    # W gamma(x, 0) - W gamma(0, 0) = W (gamma(x, 0) - gamma(0, 0)): the column rows come out of one matmul
    origin = fourier_encoding(xs.new_zeros(1, 2), num_frequencies)
    column_codes = fourier_encoding(torch.stack([xs, torch.zeros_like(xs)], -1), num_frequencies) - origin
    row_codes = fourier_encoding(torch.stack([torch.zeros_like(ys), ys], -1), num_frequencies)
    box_map = box_features.permute(0, 2, 3, 1).reshape(-1, box_channels)
    image_map = image_features.permute(0, 2, 3, 1).reshape(-1, image_channels)
    image_part = (image_map, image_w, None) if image_rows is None else (image_rows, None, None)
    shape = (tuple(box_features.shape[-2:]), tuple(image_features.shape[-2:]), ys, xs, box_features.shape[0], pixel_grid, extent, mask_prior)
    if box_rows:
        inputs = [(box_map, box_w, bias), image_part, (column_codes, coord_w, None), (row_codes, coord_w, None)]
        return FirstLayerTable(_table_rows(inputs, dtype), *shape)
    dtype = dtype or box_map.dtype
    values = image_rows if image_rows is not None else _table_rows([image_part], dtype)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    point_weight = torch.cat([box_w, coord_w, bias.unsqueeze(1)], 1).t().to(dtype)
    return FirstLayerTable(values, *shape, box_map.to(dtype), point_weight, column_codes.to(dtype), row_codes.to(dtype))


def _table_rows(inputs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], dtype: torch.dtype | None) -> torch.Tensor:
    """``cat([x @ w.T + b for x, w, b in inputs])``, in ``dtype`` (None: the inputs'); ``w`` None: ``x`` are
    rows already.

    Without autograd the table is written in place, in ``dtype`` from the start: the table of a large box map
    is hundreds of MB, and concatenating, filling the bias in and converting would each pass over it again.
    The bias rides along as a column of ones times the bias, as addmm would first copy it into every row.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for part in inputs for t in part):
        values = torch.cat([x if w is None else F.linear(x, w, b) for x, w, b in inputs])
        return values if dtype is None else values.to(dtype)
    first = inputs[0][0]  # possibly a MONAI MetaTensor, whose new_empty takes other arguments
    dtype = dtype or first.dtype
    width = next(w.shape[0] for _, w, _ in inputs if w is not None)
    values = torch.empty((sum(x.shape[0] for x, _, _ in inputs), width), dtype=dtype, device=first.device)
    start = 0
    for x, w, b in inputs:
        block = values[start : start + x.shape[0]]
        start += x.shape[0]
        if w is None:
            block.copy_(x)
            continue
        if b is not None:
            x, w = torch.cat([x, x.new_ones(x.shape[0], 1)], 1), torch.cat([w, b.unsqueeze(1)], 1)
        torch.mm(x.to(dtype), w.t().to(dtype), out=block)
    return values


def table_taps(table: FirstLayerTable, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows ``[P, N, 10]`` and their weights of the points at raster ``index [P, N]`` of the grid.

    The table holds, in order: ``hb * wb`` box-map rows per prompt, ``g * g`` image-map rows per prompt, then
    the ``width`` column rows and the ``height`` row rows shared by every prompt. A table that keeps the box
    map holds the image-map rows alone: the first four taps then name box-map pixels, and the last two the
    point's column and row.
    """
    prompts = index.shape[0]
    grid_row = torch.div(index, table.width, rounding_mode="floor")
    grid_column = index - grid_row * table.width
    coords = torch.stack([table.xs[grid_column], table.ys[grid_row]], dim=-1)
    if table.extent != (1.0, 1.0):  # the output covers the top-left part of padded maps
        coords = (coords + 1) * coords.new_tensor([table.extent[1], table.extent[0]]) - 1
    (box_h, box_w), (image_h, image_w) = table.box_size, table.image_size
    box_rows, box_weights = bilinear_taps(box_h, box_w, coords)
    image_rows, image_weights = bilinear_taps(image_h, image_w, coords)
    prompt = torch.arange(prompts, device=index.device).view(prompts, 1, 1)
    box_block, image_block = box_h * box_w, image_h * image_w
    box_rows = box_rows + prompt * box_block
    if table.box_map is None:
        first_image_row = prompts * box_block
        first_column_row = first_image_row + prompts * image_block
        first_row_row = first_column_row + table.width
    else:  # the last two taps name the point's rows of column_codes and row_codes
        first_image_row = first_column_row = first_row_row = 0
    image_rows = image_rows + prompt * image_block + first_image_row
    column_rows = (grid_column + first_column_row).unsqueeze(-1)
    row_rows = (grid_row + first_row_row).unsqueeze(-1)
    taps = torch.cat([box_rows, image_rows, column_rows, row_rows], dim=-1)
    weights = torch.cat([box_weights, image_weights, box_weights.new_ones(*index.shape, 2)], dim=-1)
    return taps, weights.to(table.values.dtype)


class DenseTapsCache:
    """:func:`table_taps` of a whole output grid, kept for the next call: they depend only on the sizes, so
    re-prompting at the same output size skips computing them. One entry: an 896 x 896 grid's taps take
    about 100 MB."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._taps: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, table: FirstLayerTable) -> tuple[torch.Tensor, torch.Tensor]:
        # a training sub-lattice is drawn afresh at every step; a trace must record the computation, not a
        # tensor cached by an earlier call (the tracer would bake it in as a constant)
        if not table.pixel_grid or torch.jit.is_tracing():
            return _whole_grid_taps(table)
        key = (table.height, table.width, table.box_size, table.image_size, table.prompts,
               table.values.device, table.values.dtype, table.extent, table.box_map is None)  # fmt: skip
        if key != self._key:
            self._key, self._taps = key, _whole_grid_taps(table)
        return self._taps


class ImageRowsCache:
    """Each first layer's image-map rows (:func:`image_map_rows`) for the last image embedding it saw, kept for
    that image's next prompt: they depend on the embedding and the layer, not on the prompt, and are a
    ``[g * g, image_channels] x [image_channels, C]`` matmul (4096 x 256 x 1024 for the coarse INR of SAM's
    64 x 64 embedding: about a tenth of an adaptive re-prompt's decode in float32).

    An entry is reused only for the very same embedding tensor (held here, so that its identity cannot pass
    to another tensor) with every source tensor unmodified since (autograd's version counters, which
    in-place updates such as an optimiser step or ``load_state_dict`` advance), in the same dtype; never
    while autograd records, nor for inference-mode tensors, which carry no version counter.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, torch.Tensor]] = {}

    def __call__(
        self,
        layer: nn.Linear,
        fold: tuple[torch.Tensor, torch.Tensor] | None,
        fold_sources: tuple[torch.Tensor, ...],
        box_channels: int,
        image_channels: int,
        image_features: torch.Tensor,
        dtype: torch.dtype | None,
    ) -> torch.Tensor:
        """The rows for ``layer`` followed by ``fold`` (see :func:`folded_layer`); ``fold_sources``: the tensors
        the fold is made of."""
        sources = (image_features, *layer.parameters(), *fold_sources)
        keep = not torch.is_grad_enabled() and not any(t.is_inference() for t in sources)
        key = (tuple((t, t._version) for t in sources), dtype) if keep else None
        entry = self._entries.get(id(layer))
        if keep and entry is not None and _same_sources(entry[0], key):
            return entry[1]
        rows = image_map_rows(folded_layer(layer, fold)[0], box_channels, image_channels, image_features, dtype)
        if keep:
            self._entries[id(layer)] = (key, rows)
        return rows


def _same_sources(cached: tuple, key: tuple) -> bool:
    (cached_sources, cached_dtype), (sources, dtype) = cached, key
    return cached_dtype == dtype and len(cached_sources) == len(sources) and all(
        a is b and a_version == b_version for (a, a_version), (b, b_version) in zip(cached_sources, sources)
    )


def _whole_grid_taps(table: FirstLayerTable) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(table.height * table.width, device=table.values.device).expand(table.prompts, -1)
    return table_taps(table, index)


def evaluate_table(table: FirstLayerTable, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """First-layer outputs ``[P, N, C]`` at the points of ``taps, weights [P, N, 10]``."""
    prompts = taps.shape[0]
    if table.box_map is None:
        out = _blend(table.values, taps, weights)
    else:
        out = _blend(table.values, taps[..., 4:8], weights[..., 4:8])
        taps = taps.reshape(-1, taps.shape[-1])
        codes = table.column_codes[taps[:, 8]] + table.row_codes[taps[:, 9]]
        box_input = _blend(table.box_map, taps[:, :4], weights.reshape(taps.shape)[:, :4])
        point_input = torch.cat([box_input, codes, codes.new_ones(codes.shape[0], 1)], 1)
        out = out.addmm_(point_input, table.point_weight) if not torch.is_grad_enabled() else torch.addmm(out, point_input, table.point_weight)
    return out.view(prompts, -1, out.shape[-1])


def _blend(rows: torch.Tensor, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[P * N, C]``: for each point, the sum of the ``rows`` its ``taps [P, N, k]`` name, times ``weights``."""
    return F.embedding_bag(taps.reshape(-1, taps.shape[-1]), rows, per_sample_weights=weights.reshape(-1, weights.shape[-1]), mode="sum")


def sample_mask_prior(table: FirstLayerTable, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """The table's mask prior ``[P, N, 1 + T]`` at the points of ``taps``, or None without one. The prior is a
    box-map channel, so it is sampled with the first four (the box-map) taps."""
    if table.mask_prior is None:
        return None
    prior = _blend(table.mask_prior, taps[..., :4], weights[..., :4].float())
    return prior.view(taps.shape[0], -1, prior.shape[-1])
