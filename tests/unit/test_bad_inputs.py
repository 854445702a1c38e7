"""Bad inputs raise errors that name the problem."""

import pytest
import torch

from imedsam.networks import IMedSAM, build_imedsam


@pytest.mark.parametrize(
    "box, message",
    [
        ([10.0, 10.0, 100.0, 50.0], "outside the 88x72"),
        ([-1.0, 10.0, 30.0, 50.0], "outside"),
        ([10.0, 10.0, 10.0, 50.0], "zero area or is inverted"),
        ([40.0, 10.0, 20.0, 50.0], "zero area or is inverted"),
        ([10.0, 50.0, 30.0, 20.0], "zero area or is inverted"),
        ([10.0, float("nan"), 30.0, 50.0], "NaN or infinite"),
    ],
)
def test_bad_boxes(model: IMedSAM, images, box, message):
    boxes = torch.tensor([[box], [[0.0, 0.0, 10.0, 10.0]]])
    with pytest.raises(ValueError, match=message):
        model(images, boxes)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(1, 1, 32, 32), "3 \\(RGB\\) channels, got 1"),
        (torch.rand(1, 4, 32, 32), "3 \\(RGB\\) channels, got 4"),
        (torch.rand(3, 32, 32), "shape \\[B, 3, H, W\\]"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN or infinite"),
        (torch.rand(1, 3, 32, 32) * 255, "must be in \\[0, 1\\]"),
    ],
)
def test_bad_images(model: IMedSAM, image, message):
    with pytest.raises(ValueError, match=message):
        model(image, torch.tensor([[[1.0, 1.0, 20.0, 20.0]]]))


def test_integer_image_is_refused(model: IMedSAM):
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_mismatched_batch_sizes(model: IMedSAM, images):
    with pytest.raises(ValueError, match="boxes are for 1 images but the image batch has 2"):
        model(images, torch.tensor([[[1.0, 1.0, 20.0, 20.0]]]))


def test_bad_box_shape_and_output_size(model: IMedSAM, images, boxes):
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        model(images, boxes[..., :3])
    with pytest.raises(ValueError, match="output_size must be positive"):
        model(images, boxes, output_size=(0, 10))


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown encoder 'vit_x'"):
        build_imedsam("vit_x")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_imedsam("vit_tiny", image_size=100)
    with pytest.raises(ValueError, match="fa_mode"):
        build_imedsam("vit_tiny", image_size=64, fa_mode="wavelet")
    with pytest.raises(ValueError, match="ugs_top_k"):
        build_imedsam("vit_tiny", image_size=64, ugs_top_k=1.5)
    with pytest.raises(ValueError, match="at least 2 passes"):
        build_imedsam("vit_tiny", image_size=64, mc_samples=1)
