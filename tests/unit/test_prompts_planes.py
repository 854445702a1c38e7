"""Box prompts from interactive clients and the 2D planes of pictures and volumes."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from imedsam.inference import (
    ImageReadError,
    NonFiniteImageError,
    VolumePredictor,
    PromptError,
    image_plane,
    label_plane,
    normalize_roi,
    place_plane,
    resolve_box_prompt,
)
from imedsam.transforms import PromptPlaned


def test_slicer_roi_is_sorted_per_axis_and_becomes_pixel_edges():
    # Slicer's RAS -> IJK flip can send each axis' pair in either order.
    assert normalize_roi([40, 10, 30, 5, 2, 2]) == ([10, 40], [5, 30], (2, 2))
    prompt = resolve_box_prompt({"roi": [40, 10, 30, 5, 2, 2]}, (64, 48, 5))
    np.testing.assert_array_equal(prompt.box, [10, 5, 41, 31])
    assert prompt.slice_index == 2 and prompt.source == "roi"
    # corners [i0, j0, k0, i1, j1, k1]: read as Slicer's pairs its k-range (30, 40) would leave the volume
    corners = resolve_box_prompt({"roi": [10, 5, 2, 40, 30, 2]}, (64, 48, 5))
    np.testing.assert_array_equal(corners.box, [10, 5, 41, 31])
    assert corners.slice_index == 2
    np.testing.assert_array_equal(resolve_box_prompt({"roi": [30, 20, 4, 6]}, (64, 48)).box, [4, 6, 31, 21])


def test_two_clicks_are_opposite_corners_on_the_slice():
    request = {"foreground": [[30, 20, 3], [10, 5, 3], [50, 40, 1]]}
    # without 'slice' the last click's slice (1) is used, and it holds a single click: no box
    with pytest.raises(PromptError, match="two foreground clicks"):
        resolve_box_prompt(request, (64, 48, 5))
    prompt = resolve_box_prompt({**request, "slice": 3}, (64, 48, 5))
    np.testing.assert_array_equal(prompt.box, [10, 5, 31, 21])
    assert prompt.source == "clicks" and prompt.slice_index == 3


def test_box_field_wins_and_is_clipped_to_the_image():
    prompt = resolve_box_prompt({"box": [-5, 10, 70, 20], "roi": [1, 2, 3, 4]}, (64, 48))
    np.testing.assert_array_equal(prompt.box, [0, 10, 64, 20])
    assert prompt.source == "box" and prompt.slice_index is None


@pytest.mark.parametrize(
    "request_, shape, message",
    [
        ({"roi": [100, 120, 5, 9, 0, 0]}, (64, 48, 1), "outside the volume"),
        ({"roi": [2, 3, 1, 20, 4, 5]}, (64, 48, 7), "roi_layout"),
        ({"box": [5, 5, 5, 9]}, (64, 48), "zero area"),
        ({"box": [0, 0, 0.4, 9]}, (64, 48), "inverted|zero area"),
        ({"roi": [1, 2, 3]}, (64, 48), "6 values"),
        ({"roi": "1,2,3,4"}, (64, 48), "list of numbers"),
        ({"roi": [1, 2, "a", 4]}, (64, 48), "list of numbers"),
        ({"box": [1, 2, float("nan"), 4]}, (64, 48), "NaN"),
        ({}, (64, 48), "no box prompt"),
        ({"box": [1, 1, 9, 9]}, (64, 48, 7), "say which"),
        ({"box": [1, 1, 9, 9], "slice": 7}, (64, 48, 7), "outside the volume"),
        ({"box": [1, 1, 9, 9], "slice": "top"}, (64, 48, 7), "integer"),
        ({"foreground": [[1, 2]]}, (64, 48, 7), r"\[i, j, k\]"),
    ],
)
def test_bad_prompts_name_the_problem(request_, shape, message):
    with pytest.raises(PromptError, match=message):
        resolve_box_prompt(request_, shape)


def test_one_slice_volume_needs_no_slice():
    assert resolve_box_prompt({"box": [1, 1, 9, 9]}, (64, 48, 1)).slice_index == 0


def test_picture_plane_is_rows_by_columns_and_round_trips():
    picture = np.zeros((48, 64, 4), np.uint8)  # H x W x RGBA as on disk
    picture[5:10, 20:30, 0] = 255
    picture[..., 3] = 7
    monai_order = picture.transpose(1, 0, 2)  # MONAI loads (W, H, C)
    plane = image_plane(monai_order, planar=True)
    assert plane.shape == (48, 64, 3) and plane.dtype == np.float32
    np.testing.assert_allclose(plane[..., 0], picture[..., 0] / 255.0)
    mask = plane[..., 0] > 0.5
    back = place_plane(mask, monai_order.shape[:2])
    np.testing.assert_array_equal(back, monai_order[..., 0] > 0)
    np.testing.assert_array_equal(label_plane(back.astype(np.uint8), planar=True), mask)
    with pytest.raises(ImageReadError, match="1, 3 or 4 channels"):
        image_plane(np.zeros((64, 48, 2), np.uint8), planar=True)


def test_volume_plane_uses_the_window_and_result_fills_only_that_slice():
    volume = np.full((40, 30, 6), -1000.0, np.float32)
    volume[10:20, 5:15, 4] = 40.0
    plane = image_plane(volume, planar=False, slice_index=4, window=[-160, 240])
    assert plane.shape == (30, 40, 3)
    assert plane[5, 10, 0] == pytest.approx(0.5) and plane[0, 0, 0] == 0.0
    result = place_plane(plane[..., 0] > 0.25, volume.shape, 4)
    assert result.shape == volume.shape
    assert result[..., 4].sum() == 100 and result[..., [0, 1, 2, 3, 5]].sum() == 0
    with pytest.raises(ImageReadError, match="low < high"):
        image_plane(volume, planar=False, slice_index=4, window=[240, -160])
    with pytest.raises(ImageReadError, match="slice 9"):
        image_plane(volume, planar=False, slice_index=9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinite_voxel_on_the_prompted_slice_is_refused_and_named(bad):
    volume = np.random.default_rng(0).normal(0, 1, (16, 12, 4)).astype(np.float32)
    volume[9, 2, 3] = bad  # on another slice: slice 1 is still served
    volume[5, 7, 1] = bad
    volume[6, 3, 1] = bad  # later in array order (i before j) than [5, 7, 1]
    for window in (None, (-1, 1)):
        assert np.isfinite(image_plane(volume, planar=False, slice_index=0, window=window)).all()
        with pytest.raises(NonFiniteImageError, match=r"voxel at \[5, 7, 1\] \(i, j, k; -?(nan|inf)\), on the prompted slice"):
            image_plane(volume, planar=False, slice_index=1, window=window)
    # the 3D path names the same voxel through the same check
    predictor = VolumePredictor.__new__(VolumePredictor)
    predictor._volume, predictor.window = volume, (-1.0, 1.0)
    with pytest.raises(NonFiniteImageError, match=r"voxel at \[5, 7, 1\] \(i, j, k; -?(nan|inf)\), on a slice the prompt reaches"):
        predictor.plane(1)


def test_a_nan_or_infinite_pixel_of_a_picture_is_refused_and_named():
    picture = np.ones((20, 10, 3), np.float32)  # (W, H, C)
    picture[4, 8, 2] = np.inf
    with pytest.raises(NonFiniteImageError, match=r"pixel at \[4, 8\] \(x, y; inf\)"):
        image_plane(picture, planar=True)
    assert issubclass(NonFiniteImageError, ImageReadError)  # the app answers it with a 400, as other unreadable images
    integers = np.full((20, 10), 7, np.uint16)
    assert np.isfinite(image_plane(integers, planar=True)).all()


def test_prompt_planed_reads_png_and_nifti(tmp_path):
    picture = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "a.png")
    d = PromptPlaned()({"image": str(tmp_path / "a.png"), "roi": [20, 10, 5, 30, 0, 0]})
    np.testing.assert_allclose(d["plane"], picture / 255.0, atol=1e-6)
    np.testing.assert_array_equal(d["box"], [10, 5, 21, 31])
    assert d["spatial_shape"] == (64, 48) and d["slice"] is None

    volume = np.random.default_rng(1).normal(size=(32, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    d = PromptPlaned()({"image": str(tmp_path / "v.nii.gz"), "box": [2, 3, 20, 18], "slice": 3, "window": [-1, 1]})
    np.testing.assert_allclose(d["plane"][..., 0], np.clip((volume[:, :, 3].T + 1) / 2, 0, 1), atol=1e-6)
    assert d["spatial_shape"] == (32, 24, 5) and d["slice"] == 3


def test_corrupt_and_missing_files_are_short_clear_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="could not read image .*bad.png") as info:
        PromptPlaned()({"image": str(tmp_path / "bad.png"), "box": [0, 0, 4, 4]})
    assert len(str(info.value)) < 300
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ImageReadError, match="could not read image .*bad.nii.gz"):
        PromptPlaned()({"image": str(tmp_path / "bad.nii.gz"), "box": [0, 0, 4, 4]})
    with pytest.raises(ImageReadError, match="not found"):
        PromptPlaned()({"image": str(tmp_path / "missing.png"), "box": [0, 0, 4, 4]})


def test_prompt_planed_can_take_the_whole_image_when_unprompted(tmp_path):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "a.png")
    nib.save(nib.Nifti1Image(np.zeros((32, 24, 5), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    whole = PromptPlaned(whole_image_if_unprompted=True)
    d = whole({"image": str(tmp_path / "a.png")})
    np.testing.assert_array_equal(d["box"], [0, 0, 64, 48])
    d = whole({"image": str(tmp_path / "v.nii.gz")})
    np.testing.assert_array_equal(d["box"], [0, 0, 32, 24])
    assert d["slice"] == 2
    assert whole({"image": str(tmp_path / "a.png"), "box": [1, 2, 9, 9]})["box"].tolist() == [1, 2, 9, 9]
    with pytest.raises(PromptError, match="no box prompt"):
        PromptPlaned()({"image": str(tmp_path / "a.png")})


def test_volume_windows_follow_lite_medsam_conventions():
    from imedsam.inference import CT_WINDOW, intensity_window

    ct = np.full((16, 16, 8), -1000.0)  # air around a body
    ct[4:12, 4:12] = np.linspace(-100, 300, 8 * 8 * 8).reshape(8, 8, 8)
    assert intensity_window(ct) == CT_WINDOW == (-160.0, 240.0)  # level 40, width 400
    mr = np.zeros((16, 16, 8))
    mr[4:12, 4:12] = np.arange(1, 8 * 8 * 8 + 1).reshape(8, 8, 8)
    low, high = intensity_window(mr)
    nonzero = mr[::4, ::4, ::4][mr[::4, ::4, ::4] != 0]
    assert (low, high) == tuple(np.percentile(nonzero, [0.5, 99.5]))  # percentiles of the non-zero voxels
    assert low > 0
    assert intensity_window(mr, [10, 20]) == (10.0, 20.0)
