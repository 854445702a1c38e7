"""The optimised implicit decoder against a plain implementation of the same maths."""

import torch
import torch.nn.functional as F

from imedsam.networks.coordinates import bilinear_sample, fourier_encoding, pixel_centre_grid
from imedsam.networks.implicit_decoder import ImplicitSegmentationDecoder


def reference_decoder(decoder: ImplicitSegmentationDecoder, box_features, image_features, output_size):
    """Sample raw features with grid_sample, concatenate, run the full MLPs; T explicit dropout passes."""
    height, width = output_size
    prompts = box_features.shape[0]
    grid = pixel_centre_grid(height, width)
    sample_grid = grid.view(1, 1, -1, 2).expand(prompts, -1, -1, -1)

    def sample(features):
        out = F.grid_sample(features, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[:, :, 0].transpose(1, 2)  # [P, H*W, C]

    point_input = torch.cat(
        [sample(box_features), sample(image_features), fourier_encoding(grid, decoder.num_frequencies).expand(prompts, -1, -1)],
        dim=-1,
    )
    flat = point_input.reshape(-1, point_input.shape[-1])
    trunk = decoder.coarse_trunk(decoder.coarse_input(flat))
    head = decoder.coarse_heads[0]
    coarse_out = head(trunk)  # eval: dropout is the identity
    coarse = coarse_out[:, 0].view(prompts, -1)
    passes = torch.stack([head(trunk * mask)[:, 0] for mask in decoder.mc_masks], dim=-1)
    variance = passes.var(dim=-1).view(prompts, -1)
    k = decoder.num_refined(height * width)
    index = torch.topk(variance, k, dim=1).indices
    fine_input = torch.cat([point_input, coarse_out[:, 1:].view(prompts, height * width, -1)], dim=-1)
    selected = torch.gather(fine_input, 1, index.unsqueeze(-1).expand(-1, -1, fine_input.shape[-1]))
    fine = decoder.fine_heads[0](decoder.fine_trunk(decoder.fine_input(selected.reshape(-1, selected.shape[-1]))))
    final = coarse.scatter(1, index, fine.view(prompts, k))
    return final.view(prompts, height, width), coarse.view(prompts, height, width), variance.view(prompts, height, width)


def _randomise_batch_norm(decoder):
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)


def test_bilinear_sample_matches_grid_sample():
    features = torch.randn(3, 5, 7, 9)
    coords = torch.rand(3, 40, 2) * 2.4 - 1.2  # some points outside (-1, 1): border clamping
    expected = F.grid_sample(features, coords.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
    sampled = bilinear_sample(features.permute(0, 2, 3, 1).contiguous(), coords)
    torch.testing.assert_close(sampled, expected[:, :, 0].transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_optimised_decoder_matches_reference():
    decoder = ImplicitSegmentationDecoder(mc_samples=4, chunk_size=97).eval()
    _randomise_batch_norm(decoder)
    box_features = torch.randn(2, 32, 16, 16)
    image_features = torch.randn(2, 256, 4, 4)
    with torch.no_grad():
        out = decoder(box_features, image_features, (23, 31))
        final, coarse, variance = reference_decoder(decoder, box_features, image_features, (23, 31))
    torch.testing.assert_close(out.coarse_logits, coarse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.uncertainty, variance, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, final, atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_the_output():
    decoder = ImplicitSegmentationDecoder(mc_samples=3).eval()
    _randomise_batch_norm(decoder)
    inputs = (torch.randn(3, 32, 8, 8), torch.randn(3, 256, 2, 2), (17, 13))
    with torch.no_grad():
        decoder.chunk_size = 10**6
        whole = decoder(*inputs)
        decoder.chunk_size = 50
        chunked = decoder(*inputs)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.refined_index.sort(1).values, whole.refined_index.sort(1).values)
