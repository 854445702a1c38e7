"""One prompt type (``Prompts``) from the user to the network, and one result type (``Prediction``) back."""

from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch

from conftest import tiny_model
from imedsam.engine import PromptInferer
from imedsam.inference import Prediction, Predictor
from imedsam.networks import Prompts, as_prompts

CLICKS = {"points": [[[[30.0, 30.0]]], [[[40.0, 20.0]]]], "point_labels": [[[1]], [[0]]]}


def seeded(call):
    torch.manual_seed(7)  # UGS's MC-dropout passes run at inference: the same seed gives the same draws
    with torch.no_grad():
        return call()


# -- Prompts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({}, ValueError, "no box and no point"),
        ({"boxes": [[1.0, 2, 3, 4]]}, ValueError, r"boxes must have shape \[B, N, 4\].*\(1, 4\)"),
        ({"boxes": torch.zeros(1, 1, 5)}, ValueError, r"boxes must have shape \[B, N, 4\]"),
        ({"boxes": "10 10 20 20"}, TypeError, "boxes must be a tensor"),
        ({"points": [[[[1.0, 2]]]]}, ValueError, "points and point_labels go together"),
        ({"points": [[[1.0, 2]]], "point_labels": [[1]]}, ValueError, r"points must have shape \[B, N, K, 2\]"),
        ({"points": [[[[1.0, 2], [3, 4]]]], "point_labels": [[[1]]]}, ValueError, r"point_labels must have shape \(1, 1, 2\)"),
        ({"boxes": [[[0.0, 0, 9, 9]]], **CLICKS}, ValueError, "must share \\[B, N\\]"),
        ({"boxes": [[[0.0, 0, 9, 9]]], "modality": ""}, ValueError, "modality must be a non-empty string"),
        ({"boxes": [[[0.0, 0, 9, 9]]], "modality": 3}, ValueError, "modality must be a non-empty string"),
    ],
)
def test_prompts_refuse_bad_fields(fields, error, message):
    with pytest.raises(error, match=message):
        Prompts(**fields)


def test_prompts_convert_and_move():
    prompts = Prompts(boxes=np.array([[[1, 2, 30, 40], [0, 0, 5, 5]]]), modality="ct")
    assert prompts.boxes.dtype == torch.float32 and prompts.boxes.tolist() == [[[1, 2, 30, 40], [0, 0, 5, 5]]]
    assert (prompts.batch_size, prompts.num_prompts, prompts.kinds) == (1, 2, ("boxes", "modality"))
    clicks = Prompts(**CLICKS)
    assert clicks.point_labels.dtype == torch.int64 and clicks.kinds == ("points",)
    assert (clicks.batch_size, clicks.num_prompts) == (2, 1)
    moved = prompts.to("meta")
    assert moved.boxes.device.type == "meta" and moved.modality == "ct" and prompts.boxes.device.type == "cpu"
    assert as_prompts(prompts) is prompts
    with pytest.raises(FrozenInstanceError):
        prompts.boxes = None


# -- the network -----------------------------------------------------------------------------------------
def test_the_model_takes_prompts_or_plain_boxes_alike(model, images, boxes):
    plain = seeded(lambda: model(images, boxes))
    assert torch.equal(seeded(lambda: model(images, Prompts(boxes=boxes))), plain)
    assert torch.equal(seeded(lambda: model(images, boxes.tolist())), plain)  # a nested list, as before
    encoding = model.encode(images)
    assert torch.equal(seeded(lambda: model.decode(encoding, Prompts(boxes=boxes))), plain)
    out = seeded(lambda: model.decode_all(encoding, Prompts(boxes=boxes.int())))  # integer boxes become float32
    assert out.logits.shape == plain.shape


def test_the_model_takes_clicks_alone_or_beside_boxes(model, images, boxes):
    single = {"points": [[[[30.0, 30.0]]], [[[40.0, 20.0]]]], "point_labels": [[[1]], [[1]]]}
    clicks = seeded(lambda: model(images, Prompts(**single)))
    both = seeded(lambda: model(images, Prompts(boxes=boxes, **CLICKS)))  # a background click beside a box is enough
    plain = seeded(lambda: model(images, boxes))
    assert clicks.shape == both.shape == plain.shape
    assert not torch.equal(both, plain)  # the clicks reach the prompt encoder beside the box
    # a padding click (-1), which lets prompts of fewer clicks share a batch, is ignored wherever it lies
    def padded(x, y):
        return Prompts(points=[[[[30.0, 30.0], [x, y]]], [[[40.0, 20.0], [x, y]]]], point_labels=[[[1, -1]], [[1, -1]]])

    assert torch.equal(seeded(lambda: model(images, padded(0, 0))), seeded(lambda: model(images, padded(87, 71))))


@pytest.mark.parametrize(
    "points, labels, message",
    [
        ([[[[88.0, 3]]], [[[1.0, 1]]]], [[[1]], [[1]]], r"click 0/0/0 \(88, 3\) lies outside the 88x72"),
        ([[[[8.0, -1]]], [[[1.0, 1]]]], [[[1]], [[1]]], "lies outside"),
        ([[[[8.0, 3]]], [[[1.0, 1]]]], [[[1]], [[2]]], r"point_labels must be 1 \(foreground\), 0 \(background\) or -1"),
        ([[[[8.0, 3]]], [[[1.0, 1]]]], [[[1]], [[0]]], "without a box needs at least one foreground click"),
        ([[[[float("nan"), 3]]], [[[1.0, 1]]]], [[[1]], [[1]]], "NaN or infinite"),
    ],
)
def test_bad_clicks_are_refused_naming_the_problem(model, images, points, labels, message):
    with pytest.raises(ValueError, match=message):
        model(images, Prompts(points=points, point_labels=labels))


def test_a_model_refuses_prompts_it_cannot_use(model, images, boxes):
    model.prompt_kinds = ("boxes", "modality")  # a box-only model, as a subclass would declare
    try:
        with pytest.raises(ValueError, match="IMedSAM takes boxes, modality only; these prompts give points, which it cannot use"):
            model(images, Prompts(boxes=boxes, **CLICKS))
    finally:
        del model.prompt_kinds


def test_box_values_are_still_checked_through_prompts(model, images, boxes):
    bad = boxes.clone()
    bad[0, 0, 2] = 100.0
    with pytest.raises(ValueError, match="outside the 88x72"):
        model(images, Prompts(boxes=bad))


def test_inferer_passes_prompts_or_boxes(model, images, boxes):
    inferer = PromptInferer(output_size=(20, 24))
    from_boxes = seeded(lambda: inferer(images, model, boxes=boxes))
    assert from_boxes.shape == (2, 1, 20, 24)
    assert torch.equal(seeded(lambda: inferer(images, model, prompts=Prompts(boxes=boxes))), from_boxes)
    with pytest.raises(ValueError, match="one of the two"):
        inferer(images, model)
    with pytest.raises(ValueError, match="one of the two"):
        inferer(images, model, boxes=boxes, prompts=Prompts(boxes=boxes))
    # a model without a modality prompt takes the modality and decodes as without it
    assert torch.equal(seeded(lambda: inferer(images, model, prompts=Prompts(boxes=boxes, modality="ct"))), from_boxes)
    assert torch.equal(seeded(lambda: inferer(images, model, boxes=boxes, modality=["ct", "mr"])), from_boxes)
    with pytest.raises(ValueError, match="inside prompts"):
        inferer(images, model, prompts=Prompts(boxes=boxes), modality=["ct", "mr"])


# -- the predictor and its Prediction --------------------------------------------------------------------
@pytest.fixture
def picture():
    return (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)


def test_prediction_carries_the_maps_decode_size_and_cache_hit(picture):
    predictor = Predictor(tiny_model(), max_decode_side=32)
    predictor.set_image(picture)
    prediction = seeded(lambda: predictor.predict([5, 5, 60, 40]))
    assert isinstance(prediction, Prediction)
    assert prediction.probability.shape == prediction.uncertainty.shape == (45, 70)
    assert prediction.decode_size == (21, 32) and prediction.upsampled  # 45 x 70 capped to a 32-pixel side
    assert prediction.cache_hit is False
    assert not hasattr(predictor, "decode_size")  # the answer says it, not the predictor
    probability, uncertainty = prediction  # unpacks as the two maps, as predict's tuple did
    assert probability is prediction.probability and uncertainty is prediction.uncertainty
    with pytest.raises(TypeError):
        prediction[0]  # noqa: B018 - not a sequence: fields are read by name
    small = seeded(lambda: predictor.predict([5, 5, 60, 40], output_size=(20, 30)))
    assert small.decode_size == (20, 30) and not small.upsampled
    predictor.set_image(picture.copy())  # same content: served from the cache
    again = seeded(lambda: predictor.predict([5, 5, 60, 40]))
    assert again.cache_hit is True
    np.testing.assert_array_equal(again.probability, prediction.probability)


def test_predictor_takes_prompts_for_its_one_image(picture):
    predictor = Predictor(tiny_model())
    predictor.set_image(picture)
    boxes = [[5, 5, 60, 40], [0, 0, 70, 45]]
    plain = seeded(lambda: predictor.predict(boxes))
    prompted = seeded(lambda: predictor.predict(Prompts(boxes=[boxes])))
    assert prompted.probability.shape == (2, 45, 70)
    np.testing.assert_array_equal(prompted.probability, plain.probability)
    one = seeded(lambda: predictor.predict(Prompts(boxes=[boxes[:1]])))
    assert one.probability.shape == (1, 45, 70)  # a Prompts keeps its N axis; only a plain box drops it
    np.testing.assert_array_equal(one.probability[0], seeded(lambda: predictor.predict(boxes[0])).probability)
    with pytest.raises(ValueError, match="segments one image.*got 2"):
        predictor.predict(Prompts(boxes=[boxes[:1], boxes[1:]]))
    clicked = seeded(lambda: predictor.predict(Prompts(points=[[[[9.0, 9]]]], point_labels=[[[1]]])))
    assert clicked.probability.shape == (1, 45, 70)
    with pytest.raises(ValueError, match="lies outside the 70x45"):
        predictor.predict(Prompts(points=[[[[70.0, 9]]]], point_labels=[[[1]]]))
    with pytest.raises(ValueError, match="N x 4"):
        predictor.predict([[[5, 5, 60, 40]]])  # a plain [1, 1, 4] array: wrap it in Prompts instead
