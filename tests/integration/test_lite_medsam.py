"""The lite_medsam backbone: LiteMedSAM's weights, LoRA rows, frequency adapters, letterboxing, warm start."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imedsam.networks import CheckpointError, IMedSAM, build_imedsam
from imedsam.networks.lite_medsam import (
    LiteMedSAMReference,
    build_lite_medsam_parts,
    lite_medsam_weights_path,
    load_lite_medsam_weights,
)
from imedsam.networks.fused_attention import use_fused_attention_in_training
from imedsam.networks.lora import LoRAQKV, qkv_rows
from imedsam.networks.tiny_vit_encoder import AdaptedTinyViT, letterbox

pytestmark = pytest.mark.slow  # minutes: started first by tests/conftest.py

# (width, blocks) of TinyViT's three attention stages in LiteMedSAM, and their token grids
STAGES = [(128, 2, 128), (160, 6, 64), (320, 2, 64)]


@pytest.fixture(scope="module")
def pretrained() -> IMedSAM:
    return build_imedsam().eval()


def _parts():
    vit, prompt_encoder, mask_decoder = build_lite_medsam_parts()
    load_lite_medsam_weights({"image_encoder": vit, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder})
    return vit, prompt_encoder, mask_decoder


def _disk_image(height: int, width: int, centre: tuple[int, int], radius: int) -> tuple[torch.Tensor, np.ndarray]:
    """A pink disk on a dark textured background, ``[1, 3, H, W]`` in [0, 1], and its mask."""
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    rng = np.random.default_rng(0)
    image = 0.15 + 0.05 * rng.random((height, width, 3))
    image[mask] = [0.85, 0.55, 0.55]
    return torch.from_numpy(image.transpose(2, 0, 1)).float().unsqueeze(0), mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_qkv_rows_follow_tinyvit_per_head_split():
    heads, head_dim = 5, 32
    out = torch.arange(3 * heads * head_dim).float().unsqueeze(0)
    q, k, v = out.view(1, heads, -1).split([head_dim, head_dim, head_dim], dim=-1)  # TinyViT's Attention.forward
    q_rows, v_rows = qkv_rows(heads * head_dim, head_dim)
    assert torch.equal(out[0, q_rows], q.flatten())
    assert torch.equal(out[0, v_rows], v.flatten())
    assert not set(q_rows.tolist()) & set(k.flatten().long().tolist())


def test_lora_on_tinyvit_changes_q_and_v_rows_and_never_k():
    qkv = torch.nn.Linear(160, 480)
    layer = LoRAQKV(copy.deepcopy(qkv), rank=4, head_dim=32)
    x = torch.randn(3, 7, 160)
    assert torch.equal(layer(x), qkv(x))  # B starts at zero
    with torch.no_grad():
        layer.q_up.weight.normal_()
        layer.v_up.weight.normal_()
    q_rows, v_rows = qkv_rows(160, 32)
    k_rows = sorted(set(range(480)) - set(q_rows.tolist()) - set(v_rows.tolist()))
    delta = layer(x) - qkv(x)
    assert torch.equal(delta[..., k_rows], torch.zeros_like(delta[..., k_rows]))
    assert (delta[..., q_rows].abs() > 0).float().mean() > 0.99
    assert (delta[..., v_rows].abs() > 0).float().mean() > 0.99


def test_every_attention_block_gets_lora_and_an_adapter_at_its_stage_resolution():
    encoder = AdaptedTinyViT(_parts()[0]).eval()
    seen = []
    for adapter in encoder.frequency_adapters:
        adapter.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        encoder(torch.rand(1, 3, 256, 256))
    expected = [(1, grid * grid, width) for width, blocks, grid in STAGES for _ in range(blocks)]
    assert seen == expected
    wrapped = [m for m in encoder.modules() if isinstance(m, LoRAQKV)]
    assert len(wrapped) == 10 and all(m.interleaved for m in wrapped)


def test_encoder_reproduces_lite_medsam_until_trained_and_each_fa_mode_then_differs():
    vit = _parts()[0]
    reference = copy.deepcopy(vit).eval()
    image = torch.rand(1, 3, 256, 256)
    outputs = {}
    for mode in ("amplitude", "phase", "none"):
        encoder = AdaptedTinyViT(copy.deepcopy(vit), fa_mode=mode, fold_conv_bn=False).eval()
        with torch.no_grad():
            assert torch.equal(encoder(image), reference(image))
            for adapter in encoder.frequency_adapters:
                adapter.up.weight.normal_(std=0.05)
            outputs[mode] = encoder(image)
    assert len(encoder.frequency_adapters) == 0
    assert torch.equal(outputs["none"], reference(image))
    assert not torch.allclose(outputs["amplitude"], outputs["phase"], atol=1e-4)
    assert not torch.allclose(outputs["amplitude"], outputs["none"], atol=1e-4)


def test_weights_loaded_after_eval_refresh_tinyvits_cached_attention_bias():
    vit = _parts()[0]
    encoder = AdaptedTinyViT(copy.deepcopy(vit)).eval()
    state = encoder.state_dict()
    key = "vit.layers.2.blocks.3.attn.attention_biases"
    state[key] = state[key] + torch.randn_like(state[key])
    encoder.load_state_dict(state)
    fresh = AdaptedTinyViT(copy.deepcopy(vit))
    fresh.load_state_dict(state)
    fresh.eval()  # built after the load: its cache holds the new biases
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(encoder(image), fresh(image), atol=1e-6)
        assert not torch.allclose(encoder(image), AdaptedTinyViT(copy.deepcopy(vit)).eval()(image), atol=1e-3)


def test_missing_or_altered_weights_file_is_a_clear_error(tmp_path):
    parts = dict(zip(("image_encoder", "prompt_encoder", "mask_decoder"), build_lite_medsam_parts()))
    with pytest.raises(CheckpointError, match="not found"):
        load_lite_medsam_weights(parts, tmp_path / "lite_medsam.pth")
    altered = tmp_path / "altered.pth"
    shutil.copy(lite_medsam_weights_path(), altered)
    with open(altered, "r+b") as f:
        f.seek(os.path.getsize(altered) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="not the released LiteMedSAM checkpoint"):
        build_imedsam(sam_checkpoint=altered)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(lite_medsam_weights_path(), "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="altered or truncated"):
        load_lite_medsam_weights(parts, truncated)


def test_lite_medsam_refuses_another_input_size():
    with pytest.raises(ValueError, match="256"):
        build_imedsam("lite_medsam", image_size=384)


def test_trainable_parameter_count(pretrained):
    trainable = {name: p.numel() for name, p in pretrained.named_parameters() if p.requires_grad}
    rank, widths = 4, [w for w, blocks, _ in STAGES for _ in range(blocks)]
    lora = sum(4 * rank * w for w in widths)
    adapters = sum(11 * w + 4 for w in widths)  # LayerNorm 2w, down w*4 + 4, up 4*w + w
    encoder = sum(n for name, n in trainable.items() if name.startswith("image_encoder."))
    assert encoder == lora + adapters == 50_152
    head = sum(n for name, n in trainable.items() if name.startswith("box_proposal."))
    assert head == 184_769  # conv 3x3 256->64 and 64->64 with GroupNorm, conv 1x1 64->1
    assert sum(trainable.values()) - head == 1_515_754  # the README's figure for the method's parts


def test_letterbox_keeps_the_aspect_ratio_and_pads_bottom_right():
    image = torch.rand(1, 3, 100, 300) * 0.5 + 0.2
    canvas, extent = letterbox(image, 256)
    assert canvas.shape == (1, 3, 256, 256)
    assert extent == (85 / 256, 1.0)  # int(100 * 256 / 300 + 0.5) = 85 rows
    assert canvas[..., :85, :].min() == 0 and canvas[..., :85, :].max() == 1  # min-max per image
    assert torch.count_nonzero(canvas[..., 85:, :]) == 0


@pytest.mark.parametrize("shape, centre", [((150, 400), (75, 300)), ((400, 150), (300, 75))])
def test_non_square_images_segment_in_place(pretrained, shape, centre):
    image, mask = _disk_image(*shape, centre, 40)
    box = torch.tensor([[[centre[1] - 44.0, centre[0] - 44.0, centre[1] + 44.0, centre[0] + 44.0]]])
    with torch.no_grad():
        logits, uncertainty = pretrained.decode(pretrained.encode(image), box, return_uncertainty=True)
    assert logits.shape == (1, 1, *shape)
    assert _dice(logits[0, 0].numpy() > 0, mask) > 0.9
    sam = build_imedsam(use_inr=False, mask_prior=False).eval()
    with torch.no_grad():
        sam_logits = sam(image, box)
    assert sam_logits.shape == (1, 1, *shape)
    assert _dice(sam_logits[0, 0].numpy() > 0, mask) > 0.9


def test_untrained_model_is_lite_medsams_mask_and_its_uncertainty_marks_the_boundary(pretrained):
    from scipy import ndimage

    image, mask = _disk_image(200, 260, (100, 120), 60)
    box = torch.tensor([[[56.0, 36.0, 184.0, 164.0]]])
    sam = build_imedsam(use_inr=False, mask_prior=False).eval()
    with torch.no_grad():
        encoding = pretrained.encode(image)
        out = pretrained.decode_all(encoding, box)
        sam_logits = sam(image, box)
    predicted = out.logits[0, 0].numpy() > 0
    assert _dice(predicted, sam_logits[0, 0].numpy() > 0) > 0.995
    uncertainty = out.uncertainty[0, 0].numpy()
    band = predicted ^ ndimage.binary_erosion(predicted, iterations=2)
    inside = ndimage.binary_erosion(predicted, iterations=15)
    outside = ~ndimage.binary_dilation(predicted, iterations=15)
    assert uncertainty.std() > 0
    assert uncertainty[band].mean() > 100 * max(uncertainty[inside].mean(), uncertainty[outside].mean())
    # the refined points are where the uncertainty is
    refined = np.zeros(predicted.size, bool)
    refined[out.refined_index[0, 0].numpy()] = True
    assert band.reshape(-1)[refined].mean() > 4 * band.mean()


def test_training_starts_from_lite_medsam_and_moves_away_from_it():
    model = build_imedsam(mc_samples_train=2)
    image, mask = _disk_image(128, 128, (64, 64), 30)
    box = torch.tensor([[[30.0, 30.0, 98.0, 98.0]]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    target = torch.from_numpy(1.0 - mask[None, None]).float()  # the inverse: something LiteMedSAM does not predict
    model.train()
    for _ in range(2):
        out = model(image, box, (64, 64), return_all=True)
        loss = F.binary_cross_entropy_with_logits(out.logits, F.interpolate(target, size=(64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".q_up" in n for n in grads) and any("frequency_adapters" in n for n in grads)
    assert any(n.startswith("decoder.coarse_heads") for n in grads)


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "shared", "data")
KVASIR = os.path.join(SHARED, "kvasir_sessile")
SPLIT = os.path.join(SHARED, "splits", "kvasir_sessile_split.json")


@pytest.mark.skipif(not os.path.isdir(KVASIR), reason="../shared/data/kvasir_sessile is not beside the project")
def test_step0_dice_on_real_polyps_matches_lite_medsam_reference(pretrained):
    import json

    from PIL import Image

    from imedsam.data import polyp_datalist

    items = polyp_datalist(KVASIR, "test", SPLIT)[:8]
    lite_medsam = LiteMedSAMReference()
    ours, reference = [], []
    for item in items:
        image = np.asarray(Image.open(item["image"]).convert("RGB"))
        mask = np.asarray(Image.open(item["label"]).convert("L")) > 127
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        with torch.no_grad():
            tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
            logits = pretrained.decode(pretrained.encode(tensor), torch.tensor([[box]]))
        ours.append(_dice(logits[0, 0].numpy() > 0, mask))
        reference.append(_dice(lite_medsam(image, box) > 0, mask))
    assert len(items) == 8
    assert abs(np.mean(ours) - np.mean(reference)) <= 0.01, (ours, reference)
    assert np.mean(ours) > 0.85, json.dumps([round(d, 4) for d in ours])


@pytest.mark.skipif(not os.path.isdir(KVASIR), reason="../shared/data/kvasir_sessile is not beside the project")
def test_adaptive_decoding_keeps_exact_decodings_dice_on_real_polyps(pretrained):
    """The Predictor's default fast path (adaptive decoding) is lossy: stated tolerance, 0.005 Dice per image
    against the ground truth and 0.995 Dice between its mask and the exact mode's, at each image's own size."""
    from PIL import Image

    from imedsam.data import box_from_mask, polyp_datalist, read_mask
    from imedsam.inference import Predictor

    fast = Predictor(pretrained, max_decode_side=None)
    exact = Predictor(pretrained, max_decode_side=None, decode_mode="exact")
    assert fast.decode_mode == "adaptive"
    for item in polyp_datalist(KVASIR, "test", SPLIT)[:4]:
        image = np.asarray(Image.open(item["image"]).convert("RGB"))
        target = read_mask(item["label"])
        assert max(target.shape) > 2 * pretrained.decoder.adaptive_coarse_size  # at least two adaptive levels
        box = box_from_mask(target)
        masks = []
        for predictor in (exact, fast):
            predictor.set_image(image)
            masks.append(predictor.predict(box).probability > 0.5)
        assert abs(_dice(masks[1], target) - _dice(masks[0], target)) <= 0.005
        assert _dice(masks[1], masks[0]) >= 0.995


def test_training_mode_keeps_the_frozen_tinyvits_batchnorm_statistics():
    model = build_imedsam()
    norms = [m for m in model.image_encoder.vit.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    image = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        expected = model.eval().image_encoder(image)
        trained = model.train().image_encoder(image)
    assert norms and all(not m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=1e-5)


def test_folded_convolutions_match_tinyvits_own_and_follow_new_weights():
    vit = _parts()[0]
    plain = AdaptedTinyViT(copy.deepcopy(vit), fold_conv_bn=False)
    folded = AdaptedTinyViT(copy.deepcopy(vit))
    folded.load_state_dict(plain.state_dict())  # the same keys: folding changes no checkpoint
    with torch.no_grad():
        for adapter in (*plain.frequency_adapters, *folded.frequency_adapters):
            adapter.up.weight.fill_(0.01)  # let the frequency stream (which runs the folded downsamplers) count
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(image), plain.eval()(image), atol=1e-4, rtol=1e-4)
    # in training (frozen BatchNorms stay in eval) the outputs and the trainable parameters' gradients agree
    for encoder in (plain, folded):
        encoder.train()
        encoder(image).square().mean().backward()
    trainable = [name for name, p in plain.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for name, p in plain.named_parameters() if name in trainable)
    folded_params = dict(folded.named_parameters())
    for name, parameter in plain.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(folded_params[name].grad, parameter.grad, atol=1e-5, rtol=1e-3)
    # new BatchNorm statistics loaded into the folded encoder are used at once
    state = plain.state_dict()
    for key in [k for k in state if k.endswith("bn.running_var")]:
        state[key] = state[key] * 2.0
    plain.load_state_dict(state)
    folded.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(image), plain.eval()(image), atol=1e-4, rtol=1e-4)


def test_checkpointed_stages_and_fused_attention_give_the_same_gradients_and_a_bfloat16_stem_stays_close():
    vit = _parts()[0]
    plain = AdaptedTinyViT(copy.deepcopy(vit), fused_attention=False).train()
    checkpointed = AdaptedTinyViT(copy.deepcopy(vit), checkpoint_stages=(0, 2), fused_attention=False).train()
    fused = AdaptedTinyViT(copy.deepcopy(vit)).train()
    variants = (plain, checkpointed, fused)
    for encoder in variants[1:]:
        encoder.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for encoder in variants:
            for adapter in encoder.frequency_adapters:
                adapter.up.weight.fill_(0.01)  # let the frequency stream, whose downsamplers are checkpointed too, count
    image = torch.rand(2, 3, 256, 256)
    outputs, kept_bytes = [], []
    for encoder in variants:
        kept = []

        def keep(tensor, kept=kept):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = encoder(image)
        out.square().mean().backward()
        outputs.append(out.detach())
        kept_bytes.append(sum(kept))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)
    # what the backward pass holds on to: checkpointing drops two stages' activations, the fused kernel the
    # attention maps
    assert kept_bytes[1] < 0.8 * kept_bytes[0] and kept_bytes[2] < 0.8 * kept_bytes[0], kept_bytes
    trainable = [(name, p) for name, p in plain.named_parameters() if p.requires_grad]
    assert trainable and not plain.stem_trains
    for encoder in variants[1:]:
        grads = dict(encoder.named_parameters())
        for name, parameter in trainable:
            torch.testing.assert_close(grads[name].grad, parameter.grad, atol=1e-6, rtol=1e-4)
    # the frozen stem in bfloat16 (training on a CPU with native bfloat16): its output is float32 and close
    with torch.no_grad():
        reduced = plain(image, frozen_stem_dtype=torch.bfloat16)
    assert reduced.dtype == torch.float32
    assert ((reduced - outputs[0]).norm() / outputs[0].norm()).item() < 0.05
    with pytest.raises(ValueError, match="checkpoint_stages"):
        AdaptedTinyViT(copy.deepcopy(vit), checkpoint_stages=(3,))
    with pytest.raises(ValueError, match="checkpoint_stages"):
        build_imedsam("vit_tiny", image_size=64, checkpoint_stages=(0,))


def test_fused_attention_is_tinyvits_attention_and_only_trains_fused():
    attention = _parts()[0].layers[2].blocks[0].attn.requires_grad_(False)  # frozen, as in AdaptedTinyViT
    with torch.no_grad():
        attention.attention_biases.normal_()  # the bias must reach the fused kernel
    fused = copy.deepcopy(attention)
    use_fused_attention_in_training(fused)
    x = torch.randn(3, attention.attention_bias_idxs.shape[0], attention.norm.normalized_shape[0], requires_grad=True)
    tokens = x.shape[1]
    outputs, grads, attention_maps = [], [], []
    for module in (attention, fused):
        module.train()
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (shapes.append(tuple(t.shape)), t)[1], lambda t: t):
            out = module(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
        # per-window maps: [windows, heads, N, N] or [windows * heads, N, N], not the shared [1, heads, N, N] bias
        attention_maps.append(sum(shape[-2:] == (tokens, tokens) and shape[0] % len(x) == 0 for shape in shapes))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert attention_maps[0] > 0 and attention_maps[1] == 0  # TinyViT keeps [windows, heads, N, N]; fused none
    # inference is TinyViT's own forward, and a copy of the module runs its own weights
    for module in (attention, fused):
        module.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), attention(x))
        twin = copy.deepcopy(fused)
        twin.proj.weight.zero_()
        twin.proj.bias.zero_()
        assert torch.equal(twin(x), torch.zeros_like(x)) and not torch.equal(fused(x), twin(x))
    with pytest.raises(TypeError, match="not TinyViT's attention"):
        use_fused_attention_in_training(torch.nn.Linear(2, 2))
