"""Clicks through SAM's prompt encoder: the network, the training data and batches, and clicks on a volume."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import tiny_model
from imedsam.data import click_from_mask, sample_clicks
from imedsam.engine import PrepareSlabBatch, PromptInferer
from imedsam.inference import PromptError, VolumePredictor, click_prompt, resolve_volume_prompts
from imedsam.losses import CoarseFineLoss
from imedsam.networks import Prompts, build_imedsam
from imedsam.transforms import ClicksFromMaskd
from test_volume import SHAPE, OracleSession, cone


def disc_mask(height=40, width=50, centre=(20, 30), radius=9):
    rows, columns = np.mgrid[:height, :width]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


# -- clicks from masks ------------------------------------------------------------------------------------
def test_the_centre_click_is_the_pixel_farthest_from_the_background():
    mask = disc_mask()
    x, y = click_from_mask(mask)
    assert (x, y) == (30, 20)
    ring = mask & ~disc_mask(radius=4)  # the centre is not the object's: the click stays on it
    x, y = click_from_mask(ring)
    assert ring[int(y), int(x)]
    with pytest.raises(ValueError, match="mask is empty"):
        click_from_mask(np.zeros((4, 4), bool))


def test_sampled_clicks_fall_inside_the_object_and_favour_its_middle():
    mask = disc_mask()
    clicks = sample_clicks(mask, 60, np.random.RandomState(0))
    assert clicks.shape == (60, 2) and mask[clicks[:, 1].astype(int), clicks[:, 0].astype(int)].all()
    inner = disc_mask(radius=5)
    # the inner disc holds 32 % of the pixels; weighted by depth, it gets more of the clicks (55 % here)
    assert inner[clicks[:, 1].astype(int), clicks[:, 0].astype(int)].mean() > inner.sum() / mask.sum() + 0.1
    tiny = np.zeros((6, 6), bool)
    tiny[2, 3] = True
    np.testing.assert_array_equal(sample_clicks(tiny, 3, np.random.RandomState(0)), [[3, 2]] * 3)  # fewer pixels than clicks


def test_clicks_from_the_label_are_scaled_to_the_image_and_padded():
    label = torch.from_numpy(np.stack([disc_mask(), disc_mask(centre=(10, 10), radius=4)])).float()
    transform = ClicksFromMaskd(max_clicks=4).set_random_state(3)
    out = transform({"image": torch.zeros(3, 80, 100), "label": label})  # the image is twice the label's size
    points, labels = out["points"], out["point_labels"]
    assert points.shape == (2, 4, 2) and labels.shape == (2, 4) and labels.dtype == torch.int64
    for channel in range(2):
        real = labels[channel] == 1
        assert 1 <= int(real.sum()) <= 4 and (labels[channel][~real] == -1).all()
        assert bool(real[0]) and not (real[1:].int() - real[:-1].int() > 0).any()  # clicks first, padding after
        x, y = (points[channel][real] // 2).long().unbind(-1)  # back on the label's grid
        assert label[channel][y, x].bool().all()
    again = ClicksFromMaskd(max_clicks=4).set_random_state(3)({"image": torch.zeros(3, 80, 100), "label": label})
    assert torch.equal(again["points"], points)
    with pytest.raises(ValueError, match="empty mask"):
        transform({"image": torch.zeros(3, 8, 8), "label": torch.zeros(1, 8, 8)})
    with pytest.raises(ValueError, match="max_clicks"):
        ClicksFromMaskd(max_clicks=0)


# -- the network --------------------------------------------------------------------------------------
def test_a_click_names_the_same_pixel_at_any_image_size(monkeypatch):
    model = tiny_model().eval()
    seen = []
    original = model.prompt_path.forward

    def spy(embeddings, boxes, modality_rows=None, points=None):
        seen.append(points[0].clone())
        return original(embeddings, boxes, modality_rows, points)

    monkeypatch.setattr(model.prompt_path, "forward", spy)
    with torch.no_grad():
        model(torch.rand(1, 3, 50, 100), Prompts(points=[[[[0.0, 0], [99, 49]]]], point_labels=[[[1, 1]]]))
    # the encoder's input is 64 x 64: pixel 0's centre (0.5 of 100) lands at 0.32, pixel 99's at 63.68; SAM's
    # prompt encoder then adds the half pixel itself
    np.testing.assert_allclose(seen[0][0].numpy() + 0.5, [[0.32, 0.64], [63.68, 63.36]], atol=1e-5)


def test_training_with_clicks_reaches_the_click_embeddings():
    model = tiny_model().train()
    encoder = model.prompt_path.prompt_encoder
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert {"point_embeddings.0.weight", "point_embeddings.1.weight", "not_a_point_embed.weight"} <= trainable
    label = torch.from_numpy(disc_mask(72, 88, (36, 44), 15)).float()[None, None]
    out = model(torch.rand(1, 3, 72, 88), Prompts(points=[[[[44.0, 36], [0, 0]]]], point_labels=[[[1, -1]]]), return_all=True)
    CoarseFineLoss()(out, label.expand(1, 1, 72, 88)).backward()
    assert encoder.point_embeddings[1].weight.grad.abs().sum() > 0 and encoder.not_a_point_embed.weight.grad.abs().sum() > 0
    assert encoder.point_embeddings[2].weight.grad is None  # no box in this batch


def test_the_content_prompt_needs_a_box():
    model = build_imedsam("vit_tiny", image_size=64, content_prompt=True).eval()
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="content prompt reads the image inside a box"):
        model(image, Prompts(points=[[[[30.0, 30]]]], point_labels=[[[1]]]))
    both = model(image, Prompts(boxes=[[[10.0, 10, 50, 50]]], points=[[[[30.0, 30]]]], point_labels=[[[1]]]))
    assert both.shape == (1, 1, 64, 64)


# -- batches ----------------------------------------------------------------------------------------------
class RecordingNetwork:
    def __init__(self):
        self.kinds = []

    def __call__(self, images, prompts, size=None, **kwargs):
        self.kinds.append(prompts.kinds)
        return torch.zeros(images.shape[0], 1, *images.shape[-2:])


def test_the_inferer_prompts_a_batch_by_its_clicks_or_its_boxes():
    images, boxes = torch.rand(2, 3, 16, 16), torch.tensor([[[1.0, 1, 9, 9]], [[2.0, 2, 12, 12]]])
    points, labels = torch.tensor([[[[4.0, 4]]], [[[6.0, 6]]]]), torch.ones(2, 1, 1, dtype=torch.int64)
    for probability, expected in ((0.0, {("boxes",)}), (1.0, {("points",)})):
        network = RecordingNetwork()
        for _ in range(5):
            PromptInferer(click_prob=probability)(images, network, boxes=boxes, points=points, point_labels=labels)
        assert set(network.kinds) == expected
    torch.manual_seed(0)
    network = RecordingNetwork()
    for _ in range(40):
        PromptInferer(click_prob=0.5)(images, network, boxes=boxes, points=points, point_labels=labels)
    assert 10 < network.kinds.count(("points",)) < 30
    network = RecordingNetwork()
    PromptInferer()(images, network, points=points, point_labels=labels)  # clicks without boxes: clicks
    assert network.kinds == [("points",)]
    with pytest.raises(ValueError, match="click_prob must be a probability"):
        PromptInferer(click_prob=1.5)


def test_slab_batches_give_each_slice_its_clicks():
    depth, slabs = 3, 2
    batch = {
        "image": torch.rand(slabs, 3 * depth, 8, 8), "label": torch.rand(slabs, depth, 8, 8),
        "box": torch.rand(slabs, depth, 4), "points": torch.arange(slabs * depth * 4 * 2.0).reshape(slabs, depth, 4, 2),
        "point_labels": torch.ones(slabs, depth, 4, dtype=torch.int64),
    }  # fmt: skip
    _, _, _, extra = PrepareSlabBatch(depth)(batch)
    assert extra["points"].shape == (slabs * depth, 1, 4, 2) and extra["point_labels"].shape == (slabs * depth, 1, 4)
    assert torch.equal(extra["points"][4, 0], batch["points"][1, 1])  # slab 1, slice 1


# -- clicks on a volume -----------------------------------------------------------------------------------
def test_what_clicks_on_a_volume_mean():
    one = click_prompt([[30, 26, 10]], [[5, 5, 10], [6, 6, 2]], SHAPE)
    assert one.box is None and one.source == "points" and one.seed_slice == 10
    np.testing.assert_array_equal(one.points, [[30, 26], [5, 5]])  # the seed slice's background click joins it
    np.testing.assert_array_equal(one.point_labels, [1, 0])
    assert one.background == ((5, 5, 10), (6, 6, 2))  # and every background click still stops the walk
    corners = click_prompt([[20, 20, 10], [40, 30, 10]], None, SHAPE)
    assert corners.points is None and corners.box.tolist() == [20, 20, 41, 31]
    both_points = click_prompt([[20, 20, 10], [40, 30, 10]], None, SHAPE, mode="points")
    assert both_points.box is None and both_points.point_labels.tolist() == [1, 1]
    prompts = both_points.slice_prompts()
    assert prompts.kinds == ("points",) and prompts.points.shape == (1, 1, 2, 2)
    with pytest.raises(PromptError, match="one foreground click on slice 10 with clicks 'corners'"):
        click_prompt([[30, 26, 10]], None, SHAPE, mode="corners")
    with pytest.raises(PromptError, match="clicks must be one of auto, points, corners"):
        resolve_volume_prompts({"foreground": [[30, 26, 10]], "clicks": "both"}, SHAPE)
    assert resolve_volume_prompts({"foreground": [[20, 20, 10], [40, 30, 10]], "clicks": "points"}, SHAPE)[0].box is None


class ClickOracle(OracleSession):
    """The oracle, also answering a click prompt: the slice's object under the foreground click."""

    def decode_slice(self, k, prompt):
        if not isinstance(prompt, Prompts):
            return super().decode_slice(k, prompt)
        self.decoded.append(k)
        x, y = (int(v) for v in prompt.points[0, 0, 0])
        components, _ = ndimage.label(self.truth[:, :, k].T)
        probability = np.where(components == components[y, x], 0.95, 0.02) if components[y, x] else np.full(components.shape, 0.02)
        return probability.astype(np.float32), np.full(components.shape, 0.01, np.float32)


def test_one_click_gives_the_whole_object_in_3d():
    truth = cone()
    session = ClickOracle(truth)
    result = session.predict([click_prompt([[30, 26, 12]], None, SHAPE)])
    np.testing.assert_array_equal(result.labels > 0, truth)
    assert result.seed_slices == [12] and result.slices == [(3, 21)]


def test_the_session_passes_the_clicks_to_the_network():
    session = VolumePredictor(tiny_model().eval(), encoder_engine="torch")
    volume = np.zeros((40, 32, 6), np.float32)
    volume[10:30, 8:24, 1:5] = 1
    volume[:, :, 3] += np.linspace(0, 0.1, 32)[None]  # slices of distinct content
    session.set_volume(volume, window=(0, 1))
    calls = []
    original = session.predictor.predict
    session.predictor.predict = lambda prompts, *a, **k: calls.append(prompts) or original(prompts, *a, **k)
    result = session.predict([click_prompt([[20, 16, 3]], [[2, 2, 3]], volume.shape)])
    first = calls[0]
    assert isinstance(first, Prompts) and first.points.tolist() == [[[[20.0, 16.0], [2.0, 2.0]]]]
    assert first.point_labels.tolist() == [[[1, 0]]] and first.boxes is None
    assert result.labels.shape == volume.shape and result.seed_slices == [3]
    assert all(not isinstance(p, Prompts) for p in calls[1:])  # the walk goes on with boxes from the masks


class ArrayWithAffine(np.ndarray):
    affine = np.eye(4)


def test_the_click_protocol_of_the_volume_evaluation(tmp_path, monkeypatch):
    import imedsam.evaluation.volumes as volumes

    truth = cone()
    evaluation = volumes.VolumeEvaluation(tiny_model(), [], str(tmp_path), protocols=("click",), reference=True)
    evaluation.session = ClickOracle(truth)
    evaluation.session.set_volume = lambda *a, **k: None
    evaluation.recipe = SimpleNamespace(set_volume=lambda *a, **k: None)  # box-only: never asked for a click
    arrays = {"ct.nii.gz": truth.astype(np.float32), "label.nii.gz": truth.astype(np.uint8)}
    monkeypatch.setattr(volumes, "load_image_array", lambda path: arrays[path].view(ArrayWithAffine))
    rows = evaluation._case_rows({"image": "ct.nii.gz", "label": "label.nii.gz", "case": "cone"})
    assert [(r["protocol"], r["method"]) for r in rows] == [("click", "imedsam")]
    assert rows[0]["dsc"] == pytest.approx(1.0)


# -- LoRA in the two-way transformer ------------------------------------------------------------------------
def _pair(**options):
    torch.manual_seed(0)
    plain = build_imedsam("vit_tiny", image_size=64, **options).eval()
    torch.manual_seed(0)
    adapted = build_imedsam("vit_tiny", image_size=64, decoder_lora_rank=4, **options).eval()
    adapted.load_state_dict(plain.state_dict(), strict=False)  # the same SAM weights; the updates stay at zero
    return plain, adapted


def test_decoder_lora_starts_as_the_model_without_it_and_keeps_sams_keys():
    plain, adapted = _pair()
    image = torch.rand(1, 3, 64, 64)
    clicks = Prompts(boxes=[[[8.0, 8, 40, 50]]], points=[[[[20.0, 30]]]], point_labels=[[[1]]])
    with torch.no_grad():
        assert torch.equal(adapted(image, clicks), plain(image, clicks))
    extra = set(adapted.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("prompt_path.decoder_lora.updates.") for key in extra)
    assert set(plain.state_dict()) <= set(adapted.state_dict())  # SAM's q_proj/v_proj keys are where they were
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad} - {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trainable == extra
    assert sum(adapted.state_dict()[key].numel() for key in extra) == 23552  # rank 4 on q and v of 7 attentions


def test_decoder_lora_trains_and_its_checkpoints_are_checked(tmp_path):
    from imedsam.networks.checkpoint import CheckpointError

    plain, adapted = _pair()
    adapted.train()
    out = adapted(torch.rand(1, 3, 64, 64), Prompts(points=[[[[20.0, 30]]]], point_labels=[[[1]]]), return_all=True)
    CoarseFineLoss()(out, torch.zeros(1, 1, 64, 64)).backward()
    update = adapted.prompt_path.decoder_lora.updates["layers_0_cross_attn_token_to_image_q_proj"]
    assert update.down.weight.grad is not None and update.up.weight.grad.abs().sum() > 0
    # a copy keeps its own updates wired into its own transformer
    import copy

    twin = copy.deepcopy(adapted).eval()
    attention = twin.prompt_path.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    assert attention.q_proj.update is twin.prompt_path.decoder_lora.updates["layers_0_cross_attn_token_to_image_q_proj"]
    torch.save(adapted.state_dict(), tmp_path / "lora.pt")
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    build_imedsam("vit_tiny", image_size=64, decoder_lora_rank=4).load_checkpoint(tmp_path / "plain.pt")  # updates at zero
    with pytest.raises(CheckpointError, match="decoder_lora_rank"):
        build_imedsam("vit_tiny", image_size=64).load_checkpoint(tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="rank must be positive"):
        build_imedsam("vit_tiny", image_size=64, decoder_lora_rank=-1)


def test_a_clicks_mask_grows_to_the_object_but_not_over_a_background_click():
    from imedsam.inference import PropagationRule, grow_click_mask

    truth = disc_mask(60, 70, (30, 35), 14)

    def decode_box(box):  # a box-following oracle: the object inside the box
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        inside = np.zeros_like(truth)
        inside[y0:y1, x0:x1] = True
        probability = np.where(truth & inside, 0.95, 0.02).astype(np.float32)
        return probability, np.zeros_like(probability)

    blob = disc_mask(60, 70, (30, 35), 4)
    start = np.where(blob, 0.9, 0.1).astype(np.float32), np.zeros(blob.shape, np.float32)
    clicks, labels = np.array([[35, 30]]), np.array([1])
    probability, _, box = grow_click_mask(decode_box, *start, clicks, labels, PropagationRule(click_rounds=6))
    assert box is not None and np.array_equal(probability > 0.5, truth)
    _, _, unchanged = grow_click_mask(decode_box, *start, clicks, labels, PropagationRule(click_rounds=0))
    assert unchanged is None
    # a background click near the object's rim: growing stops at the last mask that leaves it out
    kept, _, kept_box = grow_click_mask(decode_box, *start, np.array([[35, 30], [35, 18]]), np.array([1, 0]))
    assert kept_box is not None and not kept[18, 35] > 0.5 and blob.sum() < (kept > 0.5).sum() < truth.sum()
