"""Transforms and engine pieces used by the bundle."""

import logging

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandAffined

from conftest import tiny_model
from imedsam.data import box_from_mask
from imedsam.engine import PromptInferer, parameter_groups
from imedsam.networks import IMedSAMBoxMask, build_imedsam
from imedsam.transforms import BinarizeMaskd, BoxFromMaskd, EnsureRGBd, KeepForegroundd, ThresholdLogitsd


def _label(height=40, width=60):
    label = torch.zeros(1, height, width)
    label[0, 10:20, 30:45] = 1
    return label


def test_box_from_mask_is_tight_and_scaled_to_the_image_frame():
    data = {"image": torch.zeros(3, 80, 120), "label": _label()}
    box = BoxFromMaskd()(data)["box"]
    assert box.shape == (1, 4) and box.dtype == torch.float32
    assert box.tolist() == [[60.0, 20.0, 90.0, 40.0]]  # label box (30, 10, 45, 20) times 2


def test_box_jitter_only_grows_the_box_and_stays_inside():
    transform = BoxFromMaskd(jitter=5)
    transform.set_random_state(0)
    data = {"image": torch.zeros(3, 40, 60), "label": _label()}
    boxes = torch.cat([transform(data)["box"] for _ in range(30)])
    tight = torch.tensor([30.0, 10.0, 45.0, 20.0])
    assert (boxes[:, :2] <= tight[:2]).all() and (boxes[:, 2:] >= tight[2:]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
    assert len({tuple(b) for b in boxes.tolist()}) > 1


def test_box_from_an_empty_mask_names_the_file():
    label = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "masks/empty.png"})
    with pytest.raises(ValueError, match="empty mask for masks/empty.png"):
        BoxFromMaskd()({"image": torch.zeros(3, 8, 8), "label": label})


def test_binarize_and_rgb_checks():
    mask = torch.tensor([[[0.0, 127.0], [128.0, 255.0]]])
    assert BinarizeMaskd("label")({"label": mask})["label"].tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    assert BinarizeMaskd("label")({"label": mask.repeat(3, 1, 1)})["label"].shape == (1, 2, 2)
    colour = torch.stack([mask[0], mask[0] * 0, mask[0]])
    with pytest.raises(ValueError, match="colour image"):
        BinarizeMaskd("label")({"label": colour})
    assert EnsureRGBd("image")({"image": torch.zeros(1, 4, 4)})["image"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="4 channels"):
        EnsureRGBd("image")({"image": torch.zeros(4, 4, 4)})


def test_keep_foreground_redraws_and_gives_up_with_a_warning(caplog):
    data = {"image": torch.rand(1, 32, 32), "label": torch.zeros(1, 32, 32)}
    data["label"][0, 0:3, 0:3] = 1
    push_out = RandAffined(keys=["image", "label"], prob=1.0, translate_range=(40, 40), padding_mode="zeros")
    keep = KeepForegroundd(push_out, tries=3)
    keep.set_random_state(0)
    with caplog.at_level(logging.WARNING):
        out = keep(data)
    assert torch.equal(out["label"], data["label"])
    assert "lost the foreground" in caplog.text
    identity = KeepForegroundd(lambda d: d)
    assert identity(data)["label"].sum() == 9
    # a tiny object blurred below the threshold AsDiscreted applies later is lost too: redraw, then give up
    blurred = KeepForegroundd(lambda d: {**d, "label": d["label"] * 0.4}, tries=2)
    assert torch.equal(blurred(data)["label"], data["label"])


def test_threshold_logits_keeps_uncertainty_channels():
    pred = torch.tensor([[[-1.0, 2.0]], [[0.3, 0.7]]])
    out = ThresholdLogitsd("pred", with_uncertainty=True)({"pred": pred})["pred"]
    assert torch.equal(out, torch.tensor([[[0.0, 1.0]], [[0.3, 0.7]]]))
    assert torch.equal(ThresholdLogitsd("pred")({"pred": pred})["pred"], torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]]))


def test_prompt_inferer_modes(images, boxes):
    model = tiny_model().eval()
    with torch.no_grad():
        logits = PromptInferer(output_size=(20, 30))(images, model, boxes=boxes)
        both = PromptInferer(with_uncertainty=True)(images, model, boxes=boxes, output_size=torch.tensor([[10, 12], [10, 12]]))
        everything = PromptInferer(return_all=True)(images, model, boxes=boxes)
        direct = model(images, boxes, (10, 12), return_all=True)
    assert logits.shape == (2, 1, 20, 30)
    assert both.shape == (2, 2, 10, 12)
    # the network's own logits, then its own uncertainty map, channel after channel
    torch.testing.assert_close(both, torch.cat([direct.logits, direct.uncertainty], dim=1))
    assert both[:, 1].max() > 0
    assert everything.coarse_logits.shape == (2, 1, 72, 88)
    with pytest.raises(ValueError, match="needs boxes"):
        PromptInferer()(images, model)
    no_inr = tiny_model(use_inr=False).eval()
    with pytest.raises(ValueError, match="returns no uncertainty map"), torch.no_grad():
        PromptInferer(with_uncertainty=True)(images, no_inr, boxes=boxes)
    with pytest.raises(ValueError, match="share the output size"):
        PromptInferer()(images, model, boxes=boxes, output_size=torch.tensor([[10, 12], [11, 12]]))


def test_parameter_groups_split_the_decoder_and_head_from_the_rest():
    model = tiny_model()
    decoder, other = parameter_groups(model, 1e-3, 0.1)
    assert decoder["lr"] == 1e-3 and other["lr"] == pytest.approx(1e-4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in decoder["params"] + other["params"]) == trainable
    # the box-proposal head starts from random weights, as the decoder does: it trains at the decoder's rate
    head = sum(p.numel() for p in model.box_proposal.parameters())
    assert sum(p.numel() for p in decoder["params"]) == sum(p.numel() for p in model.decoder.parameters()) + head


def test_freeze_sam_false_trains_sam_weights_too():
    frozen, free = tiny_model(), tiny_model(freeze_sam=False)
    assert not frozen.image_encoder.vit.patch_embed.proj.weight.requires_grad
    assert free.image_encoder.vit.patch_embed.proj.weight.requires_grad
    assert all(p.requires_grad for p in free.parameters())


def test_box_mask_model_reads_the_box_channel_and_refuses_bad_input(images):
    model = build_imedsam("vit_tiny", image_size=64, model_class=IMedSAMBoxMask).eval()
    x = torch.cat([images, torch.zeros(2, 1, 72, 88)], dim=1)
    x[0, 3, 10:40, 5:60] = 1
    x[1, 3, 0:72, 80:88] = 1
    assert IMedSAMBoxMask.box_from_channel(x[:, 3]).tolist() == [[[5.0, 10.0, 60.0, 40.0]], [[80.0, 0.0, 88.0, 72.0]]]
    # the traceable form keeps the package's one box convention (box_from_mask), on scattered masks too
    scattered = torch.rand(6, 30, 40) > 0.995
    scattered[:, 12, 17] = True
    for mask, box in zip(scattered, IMedSAMBoxMask.box_from_channel(scattered.float())):
        assert box[0].tolist() == box_from_mask(mask.numpy()).tolist()
    with torch.no_grad():
        assert model(x).shape == (2, 1, 72, 88)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        model(images)
    x[1, 3] = 0
    with pytest.raises(ValueError, match="box channel .* is empty"):
        model(x)
