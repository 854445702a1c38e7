"""3DSAM-adapter's volumetric adapters: the untrained model is the 2D one exactly, slabs mix only their own slices,
and a volume is encoded a slab at a time."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from imedsam.engine import PrepareSlabBatch, PromptInferer
from imedsam.inference import VolumePredictor, box3d_prompt
from imedsam.inference.slabs import slab_start
from imedsam.networks import build_imedsam
from imedsam.networks.adapters.volumetric import VolumetricAdapter, VolumetricAdapters
from imedsam.networks.checkpoint import OPTIONAL_PARTS
from imedsam.transforms import BoxFromMaskd


def tiny(**options):
    torch.manual_seed(0)
    return build_imedsam("vit_tiny", image_size=64, **options).eval()


def with_adapters(slab_depth=5, blocks="all"):
    """A vit_tiny with adapters whose weights are those of ``tiny()`` for every other part."""
    model = tiny(volumetric_adapter=True, slab_depth=slab_depth, volumetric_blocks=blocks)
    missing, unexpected = model.load_state_dict(tiny().state_dict(), strict=False)
    assert not unexpected and all(key.startswith("image_encoder.volumetric_adapters.") for key in missing)
    return model


def randomise(adapters: nn.Module) -> None:
    torch.manual_seed(1)
    for parameter in adapters.parameters():
        nn.init.normal_(parameter, std=0.05)


def test_untrained_adapters_leave_the_2d_model_exactly():
    plain, adapted = tiny(), with_adapters()
    images, boxes = torch.rand(5, 3, 64, 64), torch.tensor([[[8.0, 10, 50, 40]]]).repeat(5, 1, 1)
    with torch.no_grad():
        assert torch.equal(plain.encode(images).embedding, adapted.encode(images, slab_depth=5).embedding)
        assert torch.equal(plain(images, boxes), adapted(images, boxes, slab_depth=5))


def test_lite_medsam_with_untrained_adapters_is_lite_medsam_bit_for_bit():
    plain = build_imedsam().eval()
    adapted = build_imedsam(volumetric_adapter=True).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)
    plain.encoder_precision = adapted.encoder_precision = "float32"
    images = torch.rand(5, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(plain.encode(images).embedding, adapted.encode(images, slab_depth=5).embedding)


def test_trainable_parameters_are_the_adapters_beside_lora_and_the_frequency_adapter():
    plain, adapted = tiny(freeze_sam=True), tiny(volumetric_adapter=True, freeze_sam=True)
    trainable = lambda model: {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    encoder = adapted.image_encoder
    width, hidden, blocks = encoder.block_widths[0], 32, len(encoder.block_widths)
    per_block = (width * hidden + hidden) + (hidden * 27 + hidden) + (hidden * width + width)
    added = set(trainable(adapted)) - set(trainable(plain))
    assert added == {f"image_encoder.volumetric_adapters.{n}" for n, _ in encoder.volumetric_adapters.named_parameters()}
    assert sum(trainable(adapted)[n] for n in added) == blocks * per_block
    assert set(trainable(plain)) <= set(trainable(adapted))  # LoRA, frequency adapters, decoder: as before
    lora = ("q_down", "q_up", "v_down", "v_up")
    assert not any(p.requires_grad for n, p in encoder.vit.named_parameters() if not any(f".{part}." in n for part in lora))
    print(f"volumetric adapters: {blocks * per_block} trainable parameters in {blocks} blocks of vit_tiny")
    half = tiny(volumetric_adapter=True, volumetric_blocks="last_half").image_encoder.volumetric_adapters
    assert sorted(int(k) for k in half.adapters) == list(range(blocks // 2, blocks))


def test_a_slice_sees_its_slab_and_nothing_beyond_it():
    model = with_adapters(slab_depth=3)
    randomise(model.image_encoder.volumetric_adapters)
    images = torch.rand(6, 3, 64, 64)
    changed = images.clone()
    changed[2] = torch.rand(3, 64, 64)  # the last slice of the first slab
    with torch.no_grad():
        before = model.encode(images, slab_depth=3).embedding
        after = model.encode(changed, slab_depth=3).embedding
        alone_before = model.encode(images, slab_depth=1).embedding
        alone_after = model.encode(changed, slab_depth=1).embedding
    moved = (after - before).flatten(1).abs().amax(dim=1)
    assert moved[1] > 1e-4 and moved[0] > 0  # its neighbours in the slab see it
    assert torch.equal(after[3:], before[3:])  # the next slab does not
    assert torch.equal(alone_after[:2], alone_before[:2])  # slabs of one: no neighbours


def test_a_batch_that_is_not_whole_slabs_is_refused_by_name():
    model = with_adapters()
    with pytest.raises(ValueError, match="not a whole number of slabs of 5"):
        model.encode(torch.rand(7, 3, 64, 64), slab_depth=5)
    with pytest.raises(ValueError, match="slab_depth must be a positive"):
        model.encode(torch.rand(2, 3, 64, 64), slab_depth=0)
    with pytest.raises(ValueError, match="volumetric_blocks must be one of"):
        VolumetricAdapters([32, 32], blocks="first")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        VolumetricAdapter(32, kernel_size=2)


def test_a_checkpoint_without_adapters_loads_and_the_adapters_start_at_zero(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny().state_dict(), path)
    model = tiny(volumetric_adapter=True).load_checkpoint(path)
    ups = [adapter.up.weight for adapter in model.image_encoder.volumetric_adapters.adapters.values()]
    assert all(torch.count_nonzero(weight) == 0 for weight in ups)
    assert "image_encoder.volumetric_adapters." in OPTIONAL_PARTS


def test_slabs_tile_the_volume_and_the_last_one_ends_with_it():
    assert [slab_start(k, 4, 10) for k in range(10)] == [0, 0, 0, 0, 4, 4, 4, 4, 6, 6]
    assert slab_start(2, 5, 3) == 0  # fewer slices than a slab: one slab of all of them
    with pytest.raises(IndexError, match="outside"):
        slab_start(10, 4, 10)


def test_a_volume_is_encoded_a_slab_at_a_time_and_untrained_adapters_change_no_voxel():
    volume = np.random.default_rng(0).random((40, 32, 12)).astype(np.float32) * 0.2  # no two slices alike
    volume[10:30, 8:24, 2:10] += 1
    prompt = box3d_prompt([10, 8, 2, 30, 24, 10], volume.shape)
    results = []
    for model in (tiny(), with_adapters(slab_depth=4)):
        session = VolumePredictor(model, encoder_engine="torch")
        session.set_volume(volume)
        results.append(session.predict([prompt]))
    plain, slabs = results
    assert np.array_equal(plain.labels, slabs.labels)
    assert plain.encoder_calls == 8  # the slices of the z-range
    assert slabs.encoder_calls == 12  # slabs [0, 4), [4, 8), [8, 12): whole slabs around them


def test_trained_adapters_change_the_volume_result_through_the_session():
    volume = np.random.default_rng(0).random((40, 32, 8)).astype(np.float32)
    model = with_adapters(slab_depth=4)
    session = VolumePredictor(model, encoder_engine="torch")
    session.set_volume(volume)
    before = session.predict([box3d_prompt([10, 8, 1, 30, 24, 7], volume.shape)]).probability
    randomise(model.image_encoder.volumetric_adapters)  # new weights: the cached slabs are stale
    after = session.predict([box3d_prompt([10, 8, 1, 30, 24, 7], volume.shape)]).probability
    assert not np.allclose(before, after)


def test_a_batch_of_slabs_reaches_the_network_as_consecutive_slices_with_a_box_each():
    model = with_adapters(slab_depth=3)
    label = torch.zeros(3, 64, 64)
    for k in range(3):
        label[k, 10 + k : 30 + k, 5:40] = 1
    item = {"image": torch.rand(9, 64, 64), "label": label}
    boxes = BoxFromMaskd()(item)["box"]
    assert boxes.tolist() == [[5.0, 10.0 + k, 40.0, 30.0 + k] for k in range(3)]
    batch = {"image": torch.stack([item["image"]] * 2), "label": torch.stack([label] * 2), "box": torch.stack([boxes] * 2),
             "modality": ["mr", "ct"]}  # fmt: skip
    image, target, args, kwargs = PrepareSlabBatch(slab_depth=3)(batch)
    assert image.shape == (6, 3, 64, 64) and target.shape == (6, 1, 64, 64) and kwargs["boxes"].shape == (6, 1, 4)
    assert torch.equal(image[4], batch["image"][1, 3:6]) and torch.equal(target[4, 0], label[1])
    assert kwargs["modality"] == ["mr"] * 3 + ["ct"] * 3 and kwargs["slab_depth"] == 3
    with torch.no_grad():
        logits = PromptInferer(output_size=(64, 64))(image, model, *args, **kwargs)
    assert logits.shape == (6, 1, 64, 64)
    assert PrepareSlabBatch(slab_depth=3, encoder_slab_depth=1)(batch)[3]["slab_depth"] == 1
    with pytest.raises(ValueError, match="must divide"):
        PrepareSlabBatch(slab_depth=5, encoder_slab_depth=3)
    with pytest.raises(ValueError, match="slab of 4 slices"):
        PrepareSlabBatch(slab_depth=4)(batch)
    label[1] = 0
    with pytest.raises(ValueError, match=r"empty mask .*\(channel 1\)"):
        BoxFromMaskd()({"image": item["image"], "label": label})


def test_part_switches_from_a_command_line_are_read_as_booleans_not_as_strings():
    # `python -m monai.bundle run ... --volumetric_adapter false` passes the string "false"
    assert tiny(volumetric_adapter="false").image_encoder.volumetric_adapters is None
    assert tiny(volumetric_adapter="True").image_encoder.volumetric_adapters is not None
    with pytest.raises(TypeError, match="volumetric_adapter must be true or false, got 'no'"):
        tiny(volumetric_adapter="no")
