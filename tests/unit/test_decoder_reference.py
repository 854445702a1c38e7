"""The optimised implicit decoder against a plain implementation of the same maths (in float32, where the
two must agree to 1e-5), and the precision setting."""

import pytest
import torch
import torch.nn.functional as F

from imedsam.networks.coordinates import bilinear_taps, fourier_encoding, pixel_centres
from imedsam.networks.implicit.heads import coarse_logit
from imedsam.networks.implicit_decoder import ImplicitSegmentationDecoder
from imedsam.networks.implicit_reference import reference_decode


def pixel_centre_grid(height: int, width: int) -> torch.Tensor:
    """Normalised (x, y) of every pixel centre, raster order: ``[height * width, 2]``."""
    grid_y, grid_x = torch.meshgrid(pixel_centres(height), pixel_centres(width), indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def blend_taps(feature_map: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``[M, h, w, C]`` channel-last map at ``[M, P, 2]`` points: the weighted sum of the four rows that
    bilinear_taps names -> ``[M, P, C]``."""
    m, h, w, c = feature_map.shape
    rows, weights = bilinear_taps(h, w, coords)
    gathered = torch.stack([feature_map[i].reshape(h * w, c)[rows[i]] for i in range(m)])  # [M, P, 4, C]
    return (gathered * weights.unsqueeze(-1)).sum(dim=2)


def reference_decoder(decoder, box_features, image_features, output_size, lines=None):
    out = reference_decode(decoder, box_features, image_features, output_size, query_lines=lines)
    return out.logits, out.coarse_logits, out.uncertainty


def _randomise_batch_norm(decoder):
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)


def test_bilinear_taps_blend_to_grid_sample():
    features = torch.randn(3, 5, 7, 9)
    coords = torch.rand(3, 40, 2) * 2.4 - 1.2  # some points outside (-1, 1): border clamping
    expected = F.grid_sample(features, coords.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
    sampled = blend_taps(features.permute(0, 2, 3, 1).contiguous(), coords)
    torch.testing.assert_close(sampled, expected[:, :, 0].transpose(1, 2), atol=1e-6, rtol=1e-5)


# A 16 x 16 box map has fewer pixels than the 23 x 31 grid has points, so the table holds its rows; a 32 x 32
# one has more, so the table keeps the map and blends it at each point (first_layer_table's module docstring).
BOX_MAP_SIDES = pytest.mark.parametrize("box_side", [16, 32], ids=["box rows in the table", "box map kept"])


@BOX_MAP_SIDES
def test_optimised_decoder_matches_reference(box_side):
    decoder = ImplicitSegmentationDecoder(mc_samples=4, chunk_size=97, precision="float32").eval()
    _randomise_batch_norm(decoder)
    box_features = torch.randn(2, 32, box_side, box_side)
    image_features = torch.randn(2, 256, 4, 4)
    with torch.no_grad():
        out = decoder(box_features, image_features, (23, 31))
        final, coarse, variance = reference_decoder(decoder, box_features, image_features, (23, 31))
    torch.testing.assert_close(out.coarse_logits, coarse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, variance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, final, atol=1e-5, rtol=1e-5)


def test_sub_lattice_matches_reference_at_its_points():
    decoder = ImplicitSegmentationDecoder(mc_samples=4, chunk_size=64, precision="float32").eval()
    _randomise_batch_norm(decoder)
    box_features, image_features = torch.randn(2, 32, 16, 16), torch.randn(2, 256, 4, 4)
    lines = (torch.tensor([0, 2, 3, 7, 11, 22]), torch.tensor([1, 4, 5, 9, 16, 20, 30]))
    with torch.no_grad():
        out = decoder(box_features, image_features, (23, 31), query_lines=lines)
        final, coarse, variance = reference_decoder(decoder, box_features, image_features, (23, 31), lines)
    assert out.logits.shape == (2, 6, 7)
    torch.testing.assert_close(out.coarse_logits, coarse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, variance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, final, atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_the_output():
    decoder = ImplicitSegmentationDecoder(mc_samples=3, precision="float32").eval()
    _randomise_batch_norm(decoder)
    inputs = (torch.randn(3, 32, 8, 8), torch.randn(3, 256, 2, 2), (17, 13))
    with torch.no_grad():
        decoder.chunk_size = 10**6
        whole = decoder(*inputs)
        decoder.chunk_size = 50
        chunked = decoder(*inputs)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.refined_index.sort(1).values, whole.refined_index.sort(1).values)


def test_training_trunk_matches_reference_with_batch_statistics():
    torch.manual_seed(0)
    decoder = ImplicitSegmentationDecoder(mc_samples=4, mc_samples_train=2).train()
    box_features, image_features = torch.randn(2, 32, 8, 8), torch.randn(2, 256, 4, 4)
    height, width = 9, 11
    flat_grid = pixel_centre_grid(height, width)
    sample_grid = flat_grid.view(1, 1, -1, 2).expand(2, -1, -1, -1)

    def sample(features):
        return F.grid_sample(features, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0].transpose(1, 2)

    point_input = torch.cat([sample(box_features), sample(image_features), fourier_encoding(flat_grid).expand(2, -1, -1)], -1)
    expected = decoder.coarse_trunk(decoder.coarse_input(point_input.reshape(-1, point_input.shape[-1])))
    plan = decoder.plan("exact", 2, height * width, box_features.device, torch.float32)
    ys, xs = pixel_centres(height), pixel_centres(width)
    table = decoder.first_layer_table(decoder.coarse_input, decoder.coarse_trunk, plan, box_features, image_features, ys, xs)
    first, _ = decoder.first_layer(table, dense=slice(0, height * width))
    trunk = decoder.trunk_runner(decoder.coarse_trunk, plan)(first)
    torch.testing.assert_close(trunk.reshape(-1, trunk.shape[-1]), expected, atol=1e-4, rtol=1e-4)
    # training dropout keeps the logit unbiased: averaged over many draws it approaches the plain logit
    head = decoder.coarse_heads[0]
    plain = F.linear(trunk, head.weight[:1], head.bias[:1]).squeeze(-1)
    ids = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        draws = [decoder.plan("exact", 2, height * width, box_features.device, torch.float32) for _ in range(400)]
        mean = torch.stack([coarse_logit(decoder.coarse_heads, draw, trunk, ids, draw.dropout.assignment) for draw in draws]).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean() + 1e-3


def test_bfloat16_decoding_stays_close_to_float32():
    decoder = ImplicitSegmentationDecoder(mc_samples=4, precision="float32").eval()
    _randomise_batch_norm(decoder)
    inputs = (torch.randn(2, 32, 16, 16), torch.randn(2, 256, 4, 4), (40, 36))
    with torch.no_grad():
        exact = decoder(*inputs)
        decoder.precision = "bfloat16"
        reduced = decoder(*inputs)
    scale = exact.coarse_logits.abs().max()
    assert (reduced.coarse_logits - exact.coarse_logits).abs().max() < 0.02 * scale
    assert reduced.logits.dtype == torch.float32 and reduced.uncertainty.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        ImplicitSegmentationDecoder(precision="float16")


def test_adaptive_mode_is_exact_where_it_evaluates():
    decoder = ImplicitSegmentationDecoder(mc_samples=4, adaptive_coarse_size=8, adaptive_points=10**6, precision="float32").eval()
    _randomise_batch_norm(decoder)
    inputs = (torch.randn(2, 32, 16, 16), torch.randn(2, 256, 4, 4), (30, 27))
    with torch.no_grad():
        exact = decoder(*inputs, mode="exact")
        adaptive = decoder(*inputs, mode="adaptive")
    # every point is evaluated at the last level: the coarse logits and variance are the exact ones,
    # and the fine INR's logits agree wherever the exact mode refined
    torch.testing.assert_close(adaptive.coarse_logits, exact.coarse_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adaptive.uncertainty, exact.uncertainty, atol=1e-5, rtol=1e-4)
    refined = exact.refined_index
    torch.testing.assert_close(
        adaptive.logits.flatten(1).gather(1, refined), exact.logits.flatten(1).gather(1, refined), atol=1e-5, rtol=1e-5
    )


def test_adaptive_mode_evaluates_a_bounded_set_near_the_boundary():
    decoder = ImplicitSegmentationDecoder(mc_samples=4, adaptive_coarse_size=16, adaptive_points=100, precision="float32").eval()
    _randomise_batch_norm(decoder)
    inputs = (torch.randn(1, 32, 16, 16), torch.randn(1, 256, 4, 4), (64, 64))
    with torch.no_grad():
        adaptive = decoder(*inputs, mode="adaptive")
        exact = decoder(*inputs, mode="exact")
        small = decoder(inputs[0], inputs[1], (16, 16), mode="adaptive")
        small_exact = decoder(inputs[0], inputs[1], (16, 16), mode="exact")
    index = adaptive.refined_index
    assert index.shape == (1, 100) and index.unique().numel() == 100
    # where the last level evaluates, the coarse logit is the exact one; elsewhere it is interpolated
    torch.testing.assert_close(
        adaptive.coarse_logits.flatten(1).gather(1, index), exact.coarse_logits.flatten(1).gather(1, index), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(adaptive.coarse_logits, exact.coarse_logits)
    # at or below the coarse size the adaptive mode is the exact one
    torch.testing.assert_close(small.logits, small_exact.logits)
    with pytest.raises(ValueError, match="mode"):
        decoder(*inputs, mode="fast")


def test_adaptive_points_halve_at_each_coarser_level(monkeypatch):
    decoder = ImplicitSegmentationDecoder(mc_samples=4, adaptive_coarse_size=8, adaptive_points=100, precision="float32").eval()
    evaluated = []
    coarse_at = decoder.coarse_at

    def counting(plan, table, index, *args, **kwargs):
        evaluated.append(table.height * table.width if index is None else index.shape[1])
        return coarse_at(plan, table, index, *args, **kwargs)

    monkeypatch.setattr(decoder, "coarse_at", counting)
    with torch.no_grad():
        out = decoder(torch.randn(1, 32, 16, 16), torch.randn(1, 256, 4, 4), (64, 60), mode="adaptive")
    # a first grid of 8 x 8 (64 / 2**3), then 25, 50 and 100 points on the 16-, 32- and 64-row grids
    assert evaluated == [8 * 8, 25, 50, 100]
    assert out.refined_index.shape == (1, 100)


def _decoder_pair():
    """Two decoders with the same random weights: one to re-prompt, one to compute from scratch."""
    decoder = ImplicitSegmentationDecoder(mc_samples=4, precision="float32").eval()
    _randomise_batch_norm(decoder)
    fresh = ImplicitSegmentationDecoder(mc_samples=4, precision="float32").eval()
    fresh.load_state_dict(decoder.state_dict())
    return decoder, fresh


@pytest.mark.parametrize("mode", ["exact", "adaptive"])
def test_image_rows_are_kept_for_the_same_embedding_until_it_or_the_weights_change(mode):
    decoder, fresh = _decoder_pair()
    image = torch.randn(1, 256, 8, 8)
    size = (40, 36) if mode == "exact" else (150, 140)

    def both(boxes):
        with torch.no_grad():
            kept, scratch = decoder(boxes, image, size, mode=mode), fresh(boxes, image.clone(), size, mode=mode)
        torch.testing.assert_close(kept.logits, scratch.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept.uncertainty, scratch.uncertainty, atol=1e-5, rtol=1e-5)

    both(torch.randn(1, 32, 16, 16))
    rows = {key: entry[1] for key, entry in decoder.image_rows._entries.items()}
    assert len(rows) == 2  # the coarse and the fine INR's first layers
    both(torch.randn(1, 32, 16, 16))  # a new prompt on the same image: the same rows, not computed again
    assert all(decoder.image_rows._entries[key][1] is value for key, value in rows.items())
    with torch.no_grad():  # an optimiser step or a checkpoint load changes the weights in place
        for model in (decoder, fresh):
            model.coarse_input.weight.mul_(1.5)
            model.fine_trunk.input_norm.running_mean.add_(0.2)
    both(torch.randn(1, 32, 16, 16))
    with torch.no_grad():  # the embedding itself written over
        image.mul_(-1.0)
    both(torch.randn(1, 32, 16, 16))
    assert all(decoder.image_rows._entries[key][1] is not value for key, value in rows.items())


def test_image_rows_are_not_kept_while_autograd_records():
    decoder, _ = _decoder_pair()
    decoder(torch.randn(1, 32, 16, 16), torch.randn(1, 256, 8, 8), (20, 20))
    assert decoder.image_rows._entries == {}


@BOX_MAP_SIDES
def test_mask_prior_extent_and_classes_match_reference(box_side):
    decoder = ImplicitSegmentationDecoder(mc_samples=4, chunk_size=50, num_classes=2, mask_prior=True, precision="float32").eval()
    _randomise_batch_norm(decoder)
    with torch.no_grad():  # move the zero-initialised corrections off zero so that they count
        for module in (*decoder.coarse_heads, *(head.output for head in decoder.fine_heads)):
            module.weight.normal_(0, 0.05)
            module.bias.normal_(0, 0.05)
    box_features, image_features = torch.randn(3, 32, box_side, box_side), torch.randn(3, 256, 4, 4)
    mask_weights, class_ids = torch.randn(3, 32) * 0.2, torch.tensor([1, 0, 1])
    arguments = dict(class_ids=class_ids, extent=(0.75, 1.0), mask_weights=mask_weights)
    with torch.no_grad():
        out = decoder(box_features, image_features, (19, 25), **arguments)
    expected = reference_decode(decoder, box_features, image_features, (19, 25), **arguments)
    torch.testing.assert_close(out.coarse_logits, expected.coarse_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, expected.uncertainty, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="decoder.eval"):
        reference_decode(decoder.train(), box_features, image_features, (19, 25), **arguments)


@pytest.mark.parametrize(
    "flags, measured_faster, expected",
    [
        ({"avx2", "fma"}, None, "float32"),  # emulated bfloat16: several times slower than float32
        ({"avx2", "avx512f", "avx512_bf16"}, None, "bfloat16"),
        ({"avx2", "amx_bf16"}, None, "bfloat16"),
        (None, True, "bfloat16"),  # no /proc/cpuinfo: one timed matmul of each decides
        (None, False, "float32"),
    ],
)
def test_auto_precision_takes_bfloat16_only_where_the_cpu_runs_it_natively(monkeypatch, flags, measured_faster, expected):
    from imedsam.networks import precision

    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "_bfloat16_matmul_is_faster", lambda: measured_faster)
    precision.cpu_runs_bfloat16_natively.cache_clear()
    try:
        assert precision.resolve_precision("auto", "cpu") == expected
        assert precision.resolve_precision("float32", "cpu") == "float32"
        assert precision.resolve_precision("bfloat16", "cpu") == "bfloat16"
        decoder = ImplicitSegmentationDecoder(mc_samples=2).eval()  # "auto" is the default
        plan = decoder.plan("exact", 1, 10, torch.device("cpu"), torch.float32)
        assert plan.dtype == (torch.bfloat16 if expected == "bfloat16" else torch.float32)
        assert decoder.train().plan("exact", 1, 10, torch.device("cpu"), torch.float32).dtype == torch.float32
    finally:
        precision.cpu_runs_bfloat16_natively.cache_clear()
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("float16", "cpu")


def test_bfloat16_decoding_with_per_class_heads():
    decoder = ImplicitSegmentationDecoder(mc_samples=3, num_classes=3, precision="bfloat16").eval()
    inputs = (torch.randn(4, 32, 8, 8), torch.randn(4, 256, 2, 2), (12, 10))
    class_ids = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        reduced = decoder(*inputs, class_ids=class_ids)
        decoder.precision = "float32"
        exact = decoder(*inputs, class_ids=class_ids)
    assert reduced.logits.dtype == torch.float32
    assert (reduced.coarse_logits - exact.coarse_logits).abs().max() < 0.02 * exact.coarse_logits.abs().max()


def test_first_layer_table_is_the_same_written_in_place_and_built_for_autograd():
    from imedsam.networks.first_layer_table import build_first_layer_table

    layer = torch.nn.Linear(5 + 4 + 2 * (2 * 3 + 1), 16)
    box_features, image_features = torch.randn(2, 5, 6, 7), torch.randn(2, 4, 3, 3)
    ys, xs = torch.linspace(-0.9, 0.9, 4), torch.linspace(-0.8, 0.8, 5)
    fold = (torch.rand(16) + 0.5, torch.randn(16))
    args = (layer, 5, 4, 3, box_features, image_features, ys, xs, fold)
    with_autograd = build_first_layer_table(*args).values
    assert with_autograd.requires_grad
    with torch.no_grad():
        in_place = build_first_layer_table(*args).values
    torch.testing.assert_close(in_place, with_autograd.detach(), rtol=1e-5, atol=1e-6)
    # the folded BatchNorm scales every row and shifts the box-map rows only (their weights sum to one)
    with torch.no_grad():
        unfolded = build_first_layer_table(*args[:-1]).values
    box_rows = 2 * 6 * 7
    torch.testing.assert_close(in_place[:box_rows], unfolded[:box_rows] * fold[0] + fold[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_place[box_rows:], unfolded[box_rows:] * fold[0], rtol=1e-5, atol=1e-5)
    # built in bfloat16 from the start (the decoder's reduced precision): float32's table, rounded
    with torch.no_grad():
        reduced = build_first_layer_table(*args, dtype=torch.bfloat16).values
    assert reduced.dtype == torch.bfloat16
    assert ((reduced.float() - in_place).norm() / in_place.norm()).item() < 1e-2


def test_keeping_the_box_map_gives_the_table_rows_outputs_and_gradients():
    from imedsam.networks.first_layer_table import build_first_layer_table, evaluate_table, table_taps

    layer = torch.nn.Linear(5 + 4 + 2 * (2 * 3 + 1), 16)
    box_features = torch.randn(2, 5, 6, 7, requires_grad=True)
    image_features = torch.randn(2, 4, 3, 3)
    ys, xs = torch.linspace(-0.9, 0.9, 4), torch.linspace(-0.8, 0.8, 5)
    fold = (torch.rand(16) + 0.5, torch.randn(16))
    index = torch.randint(0, 20, (2, 9))
    outputs, gradients = [], []
    for box_rows in (True, False):
        table = build_first_layer_table(layer, 5, 4, 3, box_features, image_features, ys, xs, fold, box_rows=box_rows)
        assert (table.box_map is None) == box_rows
        out = evaluate_table(table, *table_taps(table, index))
        box_grad, weight_grad = torch.autograd.grad(out.square().sum(), (box_features, layer.weight))
        outputs.append(out.detach())
        gradients.append((box_grad, weight_grad))
        with torch.no_grad():  # the in-place inference path
            torch.testing.assert_close(evaluate_table(table, *table_taps(table, index)), out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for kept, rows in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(kept, rows, rtol=1e-4, atol=1e-4)
