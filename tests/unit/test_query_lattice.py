"""Training on a random sub-lattice of the output grid: the line sampler, the decoder, the inferer, the loss."""

import pytest
import torch

from conftest import tiny_model
from imedsam.engine import PromptInferer
from imedsam.losses import CoarseFineLoss, DiceBCELoss
from imedsam.networks.coordinates import stratified_lines
from imedsam.networks.implicit_decoder import ImplicitSegmentationDecoder


@pytest.mark.parametrize("size, count", [(384, 192), (10, 4), (7, 7), (5, 1)])
def test_stratified_lines_take_one_line_of_every_stratum(size, count):
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_lines(size, count, generator=generator) for _ in range(300)])
    assert draws.shape == (300, count) and draws.dtype == torch.long
    assert (draws[:, 1:] > draws[:, :-1]).all() and draws.min() >= 0 and draws.max() < size
    edges = torch.arange(count + 1) * size // count
    assert ((draws >= edges[:-1]) & (draws < edges[1:])).all()
    assert set(draws.flatten().tolist()) == set(range(size))  # every line can be drawn


def test_stratified_lines_refuse_impossible_counts():
    for count in (0, 11):
        with pytest.raises(ValueError, match=f"cannot draw {count} of 10 lines"):
            stratified_lines(10, count)


def test_decoder_trains_on_a_sub_lattice_with_top_k_inside_it():
    torch.manual_seed(0)
    decoder = ImplicitSegmentationDecoder(mc_samples_train=2).train()
    lines = (torch.tensor([1, 5, 8, 12]), torch.tensor([0, 3, 4, 9, 15]))
    out = decoder(torch.randn(2, 32, 8, 8), torch.randn(2, 256, 4, 4), (16, 20), query_lines=lines)
    assert out.logits.shape == out.coarse_logits.shape == out.uncertainty.shape == (2, 4, 5)
    assert out.refined_index.shape == (2, decoder.num_refined(20)) and out.refined_index.max() < 20
    out.logits.sum().backward()
    assert decoder.coarse_input.weight.grad.abs().sum() > 0 and decoder.fine_input.weight.grad.abs().sum() > 0


def test_decoder_refuses_bad_query_lines():
    decoder = ImplicitSegmentationDecoder(mc_samples=2).eval()
    inputs = (torch.randn(1, 32, 8, 8), torch.randn(1, 256, 4, 4), (16, 20))
    cases = [
        ((torch.tensor([0, 16]), torch.tensor([1])), r"query rows must be in \[0, 15\]"),
        ((torch.tensor([0]), torch.tensor([-1, 3])), r"query columns must be in \[0, 19\]"),
        ((torch.tensor([0.5]), torch.tensor([1])), "non-empty 1-D integer tensor"),
        ((torch.tensor([], dtype=torch.long), torch.tensor([1])), "non-empty 1-D integer tensor"),
    ]
    with torch.no_grad():
        for lines, message in cases:
            with pytest.raises(ValueError, match=message):
                decoder(*inputs, query_lines=lines)
        with pytest.raises(ValueError, match="cannot be combined with mode='adaptive'"):
            decoder(*inputs, mode="adaptive", query_lines=(torch.tensor([0]), torch.tensor([1])))


def test_loss_reads_the_full_resolution_target_at_the_decoded_lines():
    target = (torch.rand(2, 1, 12, 10) > 0.5).float()
    rows, columns = torch.tensor([0, 4, 11]), torch.tensor([2, 3, 9])
    final, coarse = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    loss = CoarseFineLoss(coarse_weight=0.3)
    on_lines = loss({"logits": final, "coarse_logits": coarse, "query_lines": (rows, columns)}, target)
    gathered = target[:, :, rows][:, :, :, columns]
    expected = 0.3 * DiceBCELoss()(coarse, gathered) + 0.7 * DiceBCELoss()(final, gathered)
    torch.testing.assert_close(on_lines, expected)
    # a target at another size than the grid the lines index is refused
    with pytest.raises(ValueError, match="target must be at the full output size"):
        loss({"logits": final, "coarse_logits": coarse, "query_lines": (rows, columns)}, target[..., :6, :6])


def test_inferer_draws_a_fresh_sub_lattice_each_call_and_the_loss_follows_it(images, boxes):
    torch.manual_seed(0)
    model = tiny_model().train()
    inferer = PromptInferer(output_size=(40, 36), return_all=True, query_size=10)
    first, second = inferer(images, model, boxes=boxes), inferer(images, model, boxes=boxes)
    assert first.logits.shape == (2, 1, 10, 10)
    rows, columns = first.query_lines
    assert rows.shape == columns.shape == (10,) and rows.max() < 40 and columns.max() < 36
    assert not (torch.equal(rows, second.query_lines[0]) and torch.equal(columns, second.query_lines[1]))
    target = torch.zeros(2, 1, 40, 36)
    target[..., 10:30, 8:20] = 1
    loss = CoarseFineLoss()(first, target)
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.coarse_input.weight.grad.abs().sum() > 0
    # a query size equal to a square output grid is every pixel: the plain full-grid decode
    whole = PromptInferer(output_size=(40, 40), return_all=True, query_size=40)(images, model, boxes=boxes)
    assert whole.logits.shape == (2, 1, 40, 40) and whole.query_lines is None


def test_inferer_refuses_a_query_size_it_cannot_use(images, boxes):
    model = tiny_model().train()
    with pytest.raises(ValueError, match="query_size needs return_all=True"):
        PromptInferer(query_size=8)
    with pytest.raises(ValueError, match="positive number"):
        PromptInferer(return_all=True, query_size=0)
    with pytest.raises(ValueError, match="query_size 50 exceeds the output grid 40 x 36"):
        PromptInferer(output_size=(40, 36), return_all=True, query_size=50)(images, model, boxes=boxes)
    with pytest.raises(ValueError, match="query_lines need return_all=True"):
        model(images, boxes, (40, 36), query_lines=(torch.tensor([0]), torch.tensor([0])))


def test_sam_mask_ablation_is_read_at_the_same_lines(images, boxes):
    model = tiny_model(use_inr=False).eval()
    lines = (torch.tensor([3, 20, 39]), torch.tensor([0, 35]))
    with torch.no_grad():
        full = model(images, boxes, (40, 36), return_all=True)
        sub = model(images, boxes, (40, 36), return_all=True, query_lines=lines)
    torch.testing.assert_close(sub.logits, full.logits[:, :, lines[0]][:, :, :, lines[1]])
    assert sub.query_lines is lines and full.query_lines is None
    with pytest.raises(ValueError, match=r"query columns must be in \[0, 35\]"):
        model(images, boxes, (40, 36), return_all=True, query_lines=(torch.tensor([0]), torch.tensor([36])))
