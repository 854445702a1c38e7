"""The command line, the synthetic demo data, boxes from masks and the overlay pictures."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from imedsam.cli import main
from imedsam.data import box_from_mask, seeded_split, synthetic_polyp, write_synthetic_dataset
from imedsam.visualize import contour, overlay


def test_synthetic_polyp_is_deterministic_and_has_a_plausible_polyp():
    image, mask = synthetic_polyp((120, 160), seed=4)
    again, _ = synthetic_polyp((120, 160), seed=4)
    other, _ = synthetic_polyp((120, 160), seed=5)
    assert image.shape == (120, 160, 3) and image.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert np.array_equal(image, again) and not np.array_equal(image, other)
    fraction = (mask > 0).mean()
    assert 0.005 < fraction < 0.3
    # the polyp is redder than the mucosa around it
    assert image[mask > 0, 0].mean() > image[mask == 0, 0].mean()


def test_write_synthetic_dataset_layout(tmp_path):
    split = write_synthetic_dataset(tmp_path, count=5, size=(64, 80))
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert len(names) == 5
    assert json.loads((tmp_path / "split.json").read_text()) == split
    assert sorted(split["train"] + split["val"] + split["test"]) == names
    assert all(split[key] for key in ("train", "val", "test"))
    with pytest.raises(ValueError, match="at least 3"):
        write_synthetic_dataset(tmp_path / "small", count=2)


def test_box_from_mask():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 1
    assert box_from_mask(mask).tolist() == [3, 2, 9, 5]
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((4, 4)))


def test_cli_predict_writes_mask_uncertainty_and_overlay(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=3, size=(60, 90))
    checkpoint = tmp_path / "model.pt"
    torch.save(tiny_model().state_dict(), checkpoint)
    image = tmp_path / "data" / "images" / "synthetic_0000.png"
    args = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--checkpoint", str(checkpoint), "--image", str(image)]
    outputs = ["--output", str(tmp_path / "mask.png"), "--uncertainty", str(tmp_path / "unc.png"), "--overlay", str(tmp_path / "ov.png")]
    assert main(args + ["--box", "10", "10", "50", "40"] + outputs) == 0
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (60, 90) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(tmp_path / "unc.png")).shape == (60, 90, 3)
    assert np.asarray(Image.open(tmp_path / "ov.png")).shape == (60, 180, 3)
    sized = ["--output", str(tmp_path / "big.png"), "--output-size", "120", "180"]
    assert main(args + ["--box-from-mask", str(tmp_path / "data" / "masks" / "synthetic_0000.png")] + sized) == 0
    assert np.asarray(Image.open(tmp_path / "big.png")).shape == (120, 180)
    # 120 x 180 decodes in two adaptive levels by default; --decode-mode exact decodes every pixel
    exact = ["--output", str(tmp_path / "exact.png"), "--output-size", "120", "180", "--decode-mode", "exact"]
    assert main(args + ["--box-from-mask", str(tmp_path / "data" / "masks" / "synthetic_0000.png")] + exact) == 0
    assert np.asarray(Image.open(tmp_path / "exact.png")).shape == (120, 180)
    with pytest.raises(SystemExit):  # argparse refuses an unknown mode
        main(args + ["--box", "10", "10", "50", "40", "--decode-mode", "fast", "--output", str(tmp_path / "m.png")])


def test_cli_predict_from_clicks(tmp_path, caplog):
    write_synthetic_dataset(tmp_path / "data", count=3, size=(60, 90))
    checkpoint = tmp_path / "model.pt"
    torch.save(tiny_model().state_dict(), checkpoint)
    image = tmp_path / "data" / "images" / "synthetic_0000.png"
    args = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--checkpoint", str(checkpoint), "--image", str(image)]
    output = ["--output", str(tmp_path / "mask.png"), "--overlay", str(tmp_path / "ov.png")]
    assert main(args + ["--click", "30", "25", "--click", "35", "28", "--background-click", "2", "2"] + output) == 0
    assert np.asarray(Image.open(tmp_path / "mask.png")).shape == (60, 90)
    assert np.asarray(Image.open(tmp_path / "ov.png")).shape == (60, 180, 3)  # the image and the uncertainty
    assert main(args + ["--click", "30", "25", "--click-rounds", "2"] + output) == 0  # grown in the image, if it can be
    assert main(args + ["--click", "30", "25", "3"] + output) == 2
    assert "a click on a picture is X Y" in caplog.text
    assert main(args + ["--click", "30", "25", "--click-rounds", "-1"] + output) == 2
    assert "--click-rounds must be 0 or more" in caplog.text
    assert main(args + ["--click", "95", "25"] + output) == 2
    assert "lies outside the 90x60" in caplog.text
    assert main(args + ["--box", "1", "1", "20", "20", "--background-click", "2", "2"] + output) == 2
    assert "--background-click goes with --click" in caplog.text


def test_cli_errors_are_reported_not_raised(tmp_path, caplog):
    write_synthetic_dataset(tmp_path, count=3, size=(40, 40))
    image = str(tmp_path / "images" / "synthetic_0000.png")
    base = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--output", str(tmp_path / "m.png")]
    assert main(base + ["--image", image, "--box", "0", "0", "50", "20"]) == 2
    assert "outside the 40x40" in caplog.text
    assert main(base + ["--image", str(tmp_path / "none.png"), "--box", "0", "0", "5", "5"]) == 2
    assert "image not found" in caplog.text
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert main(base + ["--image", str(tmp_path / "junk.png"), "--box", "0", "0", "5", "5"]) == 2
    assert "could not read image" in caplog.text
    assert main(base + ["--image", image, "--box", "0", "0", "5", "5", "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "checkpoint not found" in caplog.text
    assert main(base + ["--image", image, "--box", "0", "0", "5", "5", "--encoder-engine", "openvino"]) == 2
    assert "encoder_engine 'openvino' runs the lite_medsam encoder on a CPU" in caplog.text
    assert main(base + ["--image", image, "--box", "0", "0", "5", "5", "--adaptive-points", "0"]) == 2
    assert "adaptive_points must be positive" in caplog.text


def _forged_png(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` pixels but holds almost no data (a decompression bomb's
    header): a reader that trusts it before checking would try to allocate the whole image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_cli_refuses_an_image_over_the_pixel_limit_and_names_the_limit(tmp_path, caplog):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "small.png")
    base = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--box", "1", "1", "9", "9", "--output", str(tmp_path / "m.png")]
    assert main(base + ["--image", str(tmp_path / "small.png"), "--max-pixels", "1000"]) == 2
    assert "is 40 x 30 = 1,200 pixels, above the limit of 1,000 pixels" in caplog.text
    assert not (tmp_path / "m.png").exists()
    caplog.clear()
    _forged_png(tmp_path / "bomb.png", 60_000, 60_000)  # 3.6 billion pixels in a file of 100 bytes
    assert main(base + ["--image", str(tmp_path / "bomb.png")]) == 2
    assert "bomb.png is too large to decode (Image size (3600000000 pixels)" in caplog.text
    assert "the limit here is 50,000,000 pixels" in caplog.text
    caplog.clear()
    _forged_png(tmp_path / "big.png", 9_000, 9_000)  # over our limit, under PIL's: refused from the header
    assert main(base + ["--image", str(tmp_path / "big.png")]) == 2
    assert "is 9000 x 9000 = 81,000,000 pixels, above the limit of 50,000,000 pixels" in caplog.text


@pytest.mark.parametrize(
    "output, message",
    [
        ("folder", "is a folder; name a file in it"),
        ("mask", "must end in one of .png"),
        ("mask.jpg", "must end in one of .png"),
        ("a_file/mask.png", "is a file, not a folder"),
    ],
)
def test_cli_checks_the_output_path_before_any_work(tmp_path, caplog, output, message):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("a regular file")
    args = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--box", "1", "1", "9", "9", "--image", str(tmp_path / "small.png")]
    # a checkpoint that does not exist: had the output not been checked first, the error would name it
    assert main(args + ["--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path / output)]) == 2
    assert message in caplog.text and "checkpoint not found" not in caplog.text


def test_cli_decodes_a_large_image_at_a_capped_size(tmp_path, caplog):
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(tmp_path / "wide.png")
    args = ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--box", "10", "10", "400", "250", "--image", str(tmp_path / "wide.png"),
            "--output", str(tmp_path / "m.png"), "--max-decode-side", "100"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "decoded at 100x60 (--max-decode-side 100), upsampled to 500x300" in caplog.text
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (300, 500)


def test_cli_predict_with_no_checkpoint_uses_the_default_weight_set_or_with_none_lite_medsam(tmp_path, caplog):
    from scipy import ndimage

    yy, xx = np.mgrid[:120, :200]
    disk = (yy - 60) ** 2 + (xx - 130) ** 2 <= 35**2
    image = np.full((120, 200, 3), 40, np.uint8)
    image[disk] = (220, 140, 140)
    Image.fromarray(image).save(tmp_path / "disk.png")
    args = ["predict", "--image", str(tmp_path / "disk.png"), "--box", "90", "20", "170", "100", "--output", str(tmp_path / "m.png")]
    caplog.set_level(logging.INFO)
    assert main(args) == 0
    assert "meaningless" not in caplog.text and "loaded weight set 'all_modalities'" in caplog.text
    mask = np.asarray(Image.open(tmp_path / "m.png")) > 0
    assert 2 * (mask & disk).sum() / (mask.sum() + disk.sum()) > 0.9
    assert ndimage.label(mask)[1] == 1
    caplog.clear()
    assert main(args[:-1] + [str(tmp_path / "lite.png"), "--weights", "none"]) == 0  # LiteMedSAM's own weights
    assert "loaded weight set" not in caplog.text
    lite = np.asarray(Image.open(tmp_path / "lite.png")) > 0
    assert 2 * (lite & disk).sum() / (lite.sum() + disk.sum()) > 0.9
    # the encoder compiled by OpenVINO for this CPU: the same mask, to a pixel or two of bfloat16 rounding
    assert main(args[:-1] + [str(tmp_path / "ov.png"), "--encoder-engine", "openvino"]) == 0
    compiled = np.asarray(Image.open(tmp_path / "ov.png")) > 0
    assert (compiled != mask).sum() <= 0.01 * mask.sum()


def test_contour_is_the_ring_of_pixels_with_a_background_neighbour():
    square = np.zeros((5, 5), bool)
    square[1:4, 1:4] = True
    ring = [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(contour(square), ring)
    # the image border counts as background
    np.testing.assert_array_equal(contour(np.ones((3, 4), bool)), [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]])


def test_overlay_draws_every_box_and_checks_sizes():
    picture = overlay(np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), bool), [[0, 0, 10, 10], [15, 5, 30, 20]])
    assert picture.shape == (20, 30, 3)
    assert tuple(picture[0, 0]) == tuple(picture[5, 15]) == (255, 220, 0)
    assert tuple(picture[15, 5]) == (0, 0, 0)
    with pytest.raises(ValueError, match="same size"):
        overlay(np.zeros((20, 30, 3), np.uint8), np.zeros((20, 31), bool))


def test_seeded_split_partitions_the_names_and_leaves_no_wanted_split_empty():
    names = [f"n{i}" for i in range(196)]
    split = seeded_split(names, 0, (0.6, 0.2))
    assert [len(split[k]) for k in ("train", "val", "test")] == [118, 39, 39]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(names)
    assert split == seeded_split(names[::-1], 0, (0.6, 0.2)) != seeded_split(names, 1, (0.6, 0.2))
    # rounding alone would give 2 / 1 / 0 of three names and 2 / 0 of two
    assert [len(v) for v in seeded_split(["a", "b", "c"], 0, (0.6, 0.2)).values()] == [1, 1, 1]
    assert [len(v) for v in seeded_split(["a", "b"], 0, (0.8, 0.2)).values()] == [1, 1, 0]
    # no test fraction: no test split, whatever the rounding leaves
    assert [len(v) for v in seeded_split(list("abcde"), 0, (0.5, 0.5)).values()] == [2, 3, 0]
    with pytest.raises(ValueError, match="sum of at most 1"):
        seeded_split(names, 0, (0.8, 0.4))
