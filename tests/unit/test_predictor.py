"""The interactive predictor: sizes, caching and input errors."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from imedsam.inference import Predictor


@pytest.fixture
def predictor():
    return Predictor(tiny_model())


@pytest.fixture
def picture():
    return (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)


def test_predict_returns_maps_at_the_image_size_or_output_size(predictor, picture):
    predictor.set_image(picture)
    probability, uncertainty = predictor.predict([5, 5, 60, 40])
    assert probability.shape == uncertainty.shape == (45, 70)
    assert probability.dtype == np.float32 and 0 <= probability.min() and probability.max() <= 1
    assert uncertainty.min() >= 0 and uncertainty.max() > 0
    probability, uncertainty = predictor.predict([5, 5, 60, 40], output_size=(90, 140))
    assert probability.shape == uncertainty.shape == (90, 140)
    several, _ = predictor.predict([[5, 5, 60, 40], [0, 0, 70, 45]])
    assert several.shape == (2, 45, 70)


def test_uint8_and_float_images_give_the_same_prediction(predictor, picture):
    predictor.set_image(picture)
    from_uint8, _ = predictor.predict([5, 5, 60, 40])
    predictor.set_image(picture.astype(np.float64) / 255.0)
    from_float, _ = predictor.predict([5, 5, 60, 40])
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-5)


def test_encoder_runs_once_per_image_and_model_state(predictor, picture):
    predictor.set_image(picture)
    first, _ = predictor.predict([5, 5, 60, 40])
    predictor.predict([10, 10, 30, 30])
    predictor.set_image(picture.copy())  # same content: served from the cache
    assert predictor.encoder_calls == 1
    other = picture[::-1].copy()
    predictor.set_image(other)
    predictor.set_image(picture)
    assert predictor.encoder_calls == 2
    again, _ = predictor.predict([5, 5, 60, 40])
    np.testing.assert_array_equal(again, first)
    with torch.no_grad():  # a changed encoder weight (a new checkpoint, a training step) invalidates the cache
        predictor.model.image_encoder.frequency_adapters[0].up.weight.add_(0.1)
    predictor.set_image(picture)
    assert predictor.encoder_calls == 3


def test_cache_is_bounded(picture):
    predictor = Predictor(tiny_model(), cache_size=2)
    for shift in range(4):
        predictor.set_image(np.roll(picture, shift, axis=1))
    assert len(predictor._cache) == 2
    predictor.set_image(picture)  # evicted: encoded again
    assert predictor.encoder_calls == 5


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((20, 20), np.uint8), ValueError, "H x W x 3"),
        (np.zeros((20, 20, 4), np.uint8), ValueError, "H x W x 3"),
        (np.full((20, 20, 3), 2.0), ValueError, "must be in \\[0, 1\\]"),
        (np.full((20, 20, 3), np.nan), ValueError, "NaN"),
        (np.zeros((20, 20, 3), np.int32), TypeError, "uint8 or floating"),
        (np.zeros((0, 20, 3), np.uint8), ValueError, "empty"),
    ],
)
def test_bad_images(predictor, picture, image, error, message):
    predictor.set_image(picture)
    with pytest.raises(error, match=message):
        predictor.set_image(image)
    # the failed call unset the previous image: no answer about the wrong picture
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict([1, 1, 5, 5])


def test_bad_boxes_and_order_of_calls(predictor, picture):
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict([1, 1, 5, 5])
    predictor.set_image(picture)
    with pytest.raises(ValueError, match="outside the 70x45"):
        predictor.predict([0, 0, 71, 40])
    with pytest.raises(ValueError, match="zero area"):
        predictor.predict([10, 10, 10, 20])
    with pytest.raises(ValueError, match="N x 4"):
        predictor.predict([1, 2, 3])


def test_decode_mode_is_adaptive_by_default_and_exact_on_request():
    model = tiny_model()
    model.decoder.adaptive_coarse_size = 16  # a 45 x 70 output then decodes in three adaptive levels
    image = (np.random.default_rng(1).random((45, 70, 3)) * 255).astype(np.uint8)
    box = [8, 6, 60, 40]
    fast, exact, following = (Predictor(model, decode_mode=mode) for mode in ("adaptive", "exact", None))
    assert Predictor(model).decode_mode == "adaptive"
    maps = {}
    for name, predictor in (("fast", fast), ("exact", exact), ("following", following)):
        predictor.set_image(image)
        maps[name] = predictor.predict(box).probability
    with torch.no_grad():
        tensor = torch.from_numpy(image.transpose(2, 0, 1)).float().unsqueeze(0) / 255
        expected = torch.sigmoid(model.decode(model.encode(tensor), torch.tensor([[box]], dtype=torch.float32), mode="exact"))
    np.testing.assert_allclose(maps["exact"], expected[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps["following"], maps["exact"], atol=1e-6)  # None: the model's mode, exact here
    assert not np.allclose(maps["fast"], maps["exact"], atol=1e-4)  # the adaptive levels interpolate between points
    with pytest.raises(ValueError, match="decode_mode"):
        Predictor(model, decode_mode="fast")
