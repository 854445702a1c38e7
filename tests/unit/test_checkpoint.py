"""SAM checkpoints in the official 1024 key format, I-MedSAM checkpoints, and their errors."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from imedsam.networks import CheckpointError, build_imedsam
from imedsam.networks.checkpoint import verify_official_checkpoint
from imedsam.networks.presets import build_sam_parts


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """A vit_tiny SAM checkpoint written exactly as SAM writes its own: 1024 input, flat part-prefixed keys."""
    torch.manual_seed(3)
    parts = dict(zip(("image_encoder", "prompt_encoder", "mask_decoder"), build_sam_parts("vit_tiny", 1024)))
    state = {}
    for name, module in parts.items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = torch.randn_like(value) if value.is_floating_point() else value
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny_test.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("image_size", [384, 512])
def test_sam_1024_checkpoint_loads_resized(sam_checkpoint, image_size):
    path, state = sam_checkpoint
    model = build_imedsam("vit_tiny", image_size=image_size, sam_checkpoint=path)
    vit = model.image_encoder.vit
    grid = image_size // 16
    expected_pos = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear", align_corners=False)
    torch.testing.assert_close(vit.pos_embed.data, expected_pos.permute(0, 2, 3, 1))
    # global blocks (1, 3): relative tables resized from 127 to 2 * grid - 1; windowed blocks keep 27
    assert vit.blocks[1].attn.rel_pos_h.shape[0] == 2 * grid - 1
    assert vit.blocks[3].attn.rel_pos_w.shape[0] == 2 * grid - 1
    assert torch.equal(vit.blocks[0].attn.rel_pos_h.data, state["image_encoder.blocks.0.attn.rel_pos_h"])
    # everything else is copied as is, the qkv weight included (now inside the LoRA wrapper)
    assert torch.equal(vit.patch_embed.proj.weight.data, state["image_encoder.patch_embed.proj.weight"])
    assert torch.equal(vit.blocks[2].attn.qkv.qkv.weight.data, state["image_encoder.blocks.2.attn.qkv.weight"])
    decoder = model.prompt_path.mask_decoder
    assert torch.equal(decoder.transformer.layers[0].self_attn.q_proj.weight.data, state["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"])
    pe = model.prompt_path.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert torch.equal(pe, state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, image_size, image_size), torch.tensor([[[20.0, 30.0, 200.0, 250.0]]]))
    assert out.shape == (1, 1, image_size, image_size) and torch.isfinite(out).all()


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=missing)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="could not read checkpoint .*broken.pth"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=corrupt)


def test_a_checkpoint_holding_code_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    pickled = tmp_path / "objects.pt"
    torch.save({"weight": torch.zeros(2), "callback": print}, pickled)  # a pickle that would import a callable
    with pytest.raises(CheckpointError) as raised:
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=pickled)
    assert "not a checkpoint of tensors only" in str(raised.value) and "weights_only" not in str(raised.value)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, sam_checkpoint):
    path, _ = sam_checkpoint
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="could not read checkpoint .*truncated.pth"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=truncated)


def test_checkpoint_of_another_sam_size_lists_the_mismatched_shapes(sam_checkpoint, tmp_path):
    _, state = sam_checkpoint
    wrong = dict(state)
    wrong["image_encoder.patch_embed.proj.weight"] = torch.zeros(256, 3, 16, 16)
    del wrong["image_encoder.neck.0.weight"]
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    with pytest.raises(CheckpointError) as error:
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=path)
    message = str(error.value)
    assert "wrong.pth [image_encoder]" in message and "built as 'vit_tiny'" in message
    assert "patch_embed.proj.weight: checkpoint (256, 3, 16, 16) vs model (192, 3, 16, 16)" in message
    assert "missing keys (1): neck.0.weight" in message


def test_imedsam_checkpoint_given_as_sam_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(CheckpointError, match="is an I-MedSAM checkpoint, not a SAM checkpoint: load it as model_checkpoint"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=path)


def test_non_tensor_checkpoint_is_refused(tmp_path):
    path = tmp_path / "dict.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a plain state dict of tensors"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=path)


def test_official_file_name_with_wrong_content_fails_the_md5_check(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="has MD5 .* official sam_vit_b_01ec64.pth has 01ec64d29a2fca3f0661936605ae66f8"):
        verify_official_checkpoint(path)
    other = tmp_path / "my_sam.pth"
    other.write_bytes(b"x")
    assert verify_official_checkpoint(other) is False


def test_foreign_state_dict_is_not_taken_for_sam(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="is not a SAM checkpoint: none of its keys start with image_encoder"):
        build_imedsam("vit_tiny", image_size=64, sam_checkpoint=path)


def test_model_checkpoint_round_trip_and_mismatch(tmp_path, images, boxes):
    model = tiny_model().eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    restored = build_imedsam("vit_tiny", image_size=64).load_checkpoint(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images, boxes), model(images, boxes))
    with pytest.raises(CheckpointError, match="num_classes=2") as error:
        build_imedsam("vit_tiny", image_size=64, num_classes=2).load_checkpoint(path)
    assert "unexpected keys" in str(error.value) or "missing keys" in str(error.value)
    with pytest.raises(CheckpointError, match="image_size=128.*\n.*pos_embed: checkpoint \\(1, 4, 4, 192\\) vs model \\(1, 8, 8, 192\\)"):
        build_imedsam("vit_tiny", image_size=128).load_checkpoint(path)


def test_a_checkpoint_with_the_decoders_positional_keys_still_loads(tmp_path):
    model = tiny_model()
    positions = {"input_norm": "0", "linear": "2", "output_norm": "3", "hidden": "0", "norm": "1", "output": "3"}
    legacy = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[:2] in (["decoder", "coarse_trunk"], ["decoder", "fine_trunk"]):
            parts[2] = positions[parts[2]]
        elif parts[:2] == ["decoder", "fine_heads"]:
            parts[3] = positions[parts[3]]
        legacy[".".join(parts)] = value
    assert {"decoder.coarse_trunk.3.running_var", "decoder.fine_heads.0.3.weight", "decoder.fine_trunk.0.bias"} <= set(legacy)
    torch.save(legacy, tmp_path / "legacy.pt")
    loaded = build_imedsam("vit_tiny", image_size=64).load_checkpoint(tmp_path / "legacy.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
