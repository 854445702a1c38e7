"""Volumes: prompts, the propagation rule against an oracle model, and the session on a real (tiny) network."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_model
from imedsam.inference import (
    ImageReadError,
    PromptError,
    PropagationRule,
    VolumePredictor,
    box3d_prompt,
    click_prompt,
    resolve_volume_prompts,
    roi_to_box3d,
    slice_box_prompt,
)
from imedsam.evaluation import box3d_of, end_gaps, middle_slice_box, surface_dice

SHAPE = (64, 56, 24)


def cone(shape=SHAPE, z0=3, z1=21, centre=(30, 26), r0=4.0, r1=16.0):
    """A cone along k: its disc grows from radius r0 at z0 to r1 at z1 - 1, so that each slice's object is wider
    than its neighbour's box, as organs are where they widen."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    mask = np.zeros(shape, bool)
    for k in range(z0, z1):
        radius = r0 + (r1 - r0) * (k - z0) / max(z1 - 1 - z0, 1)
        mask[:, :, k] = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 <= radius**2
    return mask


class OracleSession(VolumePredictor):
    """The propagation around a perfect box-following 2D model: inside the box it answers the true object of the
    slice, outside it nothing; any loss is then the propagation rule's."""

    def __init__(self, truth, distractor=None, rule=PropagationRule()):
        self.truth, self.distractor, self.rule = truth, distractor, rule
        self._volume = truth.astype(np.float32)
        self.predictor = SimpleNamespace(encoder_calls=0)
        self.decoded: list[int] = []

    def decode_slice(self, k, box):
        self.decoded.append(k)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        inside = np.zeros(self.truth.shape[:2][::-1], bool)
        inside[y0:y1, x0:x1] = True
        objects = self.truth[:, :, k].T | (self.distractor[:, :, k].T if self.distractor is not None else False)
        probability = np.where(inside & objects, 0.95, 0.02).astype(np.float32)
        return probability, np.full_like(probability, 0.01)


def test_box3d_recovers_a_widening_object_exactly_from_the_candidate_slice_that_fills_its_extent():
    truth = cone()  # z-range 3..20, widest at the top: the 3D box's x/y extent is the top slice's disc
    session = OracleSession(truth)
    prompt = box3d_prompt(box3d_of(truth), SHAPE)
    result = session.predict([prompt])
    np.testing.assert_array_equal(result.labels > 0, truth)
    # the middle slice (11) and those at 1/4, 3/8, 5/8, 3/4 of the range are tried with the extent; the widest
    # of them (16) seeds, and every slice of the range is decoded once
    assert prompt.seed_slice == 11 and session.decoded[:5] == [11, 7, 9, 14, 16] and result.seed_slices == [16]
    assert sorted(session.decoded) == list(range(3, 21)) and result.slices == [(3, 21)]
    # with no candidates the middle slice seeds, as in the CVPR 2024 recipe; following the neighbour's mask
    # (the recipe's way, with this rule's margins) recovers the widening object too
    for rule in (PropagationRule(seed_candidates=()), PropagationRule(seed_candidates=(), box3d_follows_masks=True)):
        middle = OracleSession(truth, rule=rule)
        found = middle.predict([prompt])
        assert found.seed_slices == [11] and sorted(middle.decoded) == list(range(3, 21))
        np.testing.assert_array_equal(found.labels > 0, truth)


def test_the_recipes_3_pixel_widening_loses_the_widening_object():
    # the CVPR 2024 rule: the neighbour's box + 3 px at 256 scale (here ~1 voxel): masks only shrink
    truth = cone(z0=6, z1=16, r0=3, r1=21)  # 2 voxels wider in radius each slice, as at thick slices
    box, k = middle_slice_box(truth)
    tight = OracleSession(truth, rule=PropagationRule(margin=0.0, min_margin=0.75))
    ours = OracleSession(truth)
    recall_tight = (tight.predict([slice_box_prompt(box, k, SHAPE)]).labels > 0)[truth].mean()
    recall_ours = (ours.predict([slice_box_prompt(box, k, SHAPE)]).labels > 0)[truth].mean()
    assert recall_ours == 1.0 and recall_tight < 0.9


def test_a_2d_box_finds_both_ends_of_the_object():
    truth = cone()
    box, k = middle_slice_box(truth)
    result = OracleSession(truth).predict([slice_box_prompt(box, k, SHAPE)])
    assert result.slices == [(3, 21)]  # walked to the first empty slice on each side, which is not kept
    assert end_gaps(result.labels > 0, truth) == (0, 0)
    np.testing.assert_array_equal(result.labels > 0, truth)


def test_the_walk_stops_where_the_box_slips_onto_another_structure():
    truth = cone(z0=8, z1=16, r0=8, r1=8)
    distractor = np.zeros(SHAPE, bool)
    distractor[10:55, 5:50, 16:] = True  # a large neighbour that starts right where the object ends
    box, k = middle_slice_box(truth)
    result = OracleSession(truth, distractor).predict([slice_box_prompt(box, k, SHAPE)])
    assert result.slices == [(8, 16)]
    np.testing.assert_array_equal(result.labels > 0, truth)


def test_background_click_stops_the_walk_and_foreground_clicks_pull_it():
    truth = cone()
    box, k = middle_slice_box(truth)
    x0, y0, x1, y1 = (int(v) for v in box)
    clicks = [[x0, y0, k], [x1 - 1, y1 - 1, k]]
    stopped = OracleSession(truth).predict([click_prompt(clicks, [[30, 26, 16]], SHAPE)])
    assert stopped.slices == [(3, 16)]
    # a rule that would stop at once still reaches the slices that have foreground clicks
    strict = OracleSession(truth, rule=PropagationRule(min_overlap=1.1))
    pulled = strict.predict([click_prompt(clicks + [[30, 26, 5]], None, SHAPE)])
    assert pulled.slices[0][0] <= 5


def test_several_objects_get_their_own_labels_and_share_slices():
    first = cone(z0=2, z1=12, centre=(16, 16), r0=5, r1=5)
    second = cone(z0=8, z1=20, centre=(46, 38), r0=6, r1=6)
    session = OracleSession(first | second)
    result = session.predict([box3d_prompt(box3d_of(first), SHAPE), box3d_prompt(box3d_of(second), SHAPE)])
    np.testing.assert_array_equal(result.labels == 1, first)
    np.testing.assert_array_equal(result.labels == 2, second)


def test_clean_up_keeps_only_what_touches_the_seed_mask():
    truth = cone(z0=4, z1=20, r0=6, r1=6)
    stray = np.zeros(SHAPE, bool)
    stray[22:24, 18:20, 14:17] = True  # inside the widened boxes of slices 14..16, never touching the object
    # the middle slice seeds (the stray, on the 3D box's edge, would make 15 the slice that fills it best)
    session = OracleSession(truth | stray, rule=PropagationRule(seed_candidates=()))
    box3d = box3d_of(truth | stray)
    result = session.predict([box3d_prompt(box3d, SHAPE)])
    assert not (result.labels > 0)[stray].any() and (result.labels > 0)[truth].all()


def test_prompts_are_checked_and_named():
    with pytest.raises(PromptError, match="outside the volume"):
        box3d_prompt([0, 0, 0, 70, 10, 4], SHAPE)
    with pytest.raises(PromptError, match="zero area"):
        box3d_prompt([5, 5, 0, 5, 10, 4], SHAPE)
    with pytest.raises(PromptError, match="whole slices"):
        box3d_prompt([0, 0, 3, 10, 10, 3], SHAPE)
    with pytest.raises(PromptError, match="slice 24 is outside"):
        slice_box_prompt([0, 0, 10, 10], 24, SHAPE)
    with pytest.raises(PromptError, match="one foreground click"):
        click_prompt([[5, 5, 3]], None, SHAPE, mode="corners")
    with pytest.raises(PromptError, match="outside the volume"):
        click_prompt([[5, 5, 3], [70, 5, 3]], None, SHAPE)
    with pytest.raises(PromptError, match="needs 'slice'"):
        resolve_volume_prompts({"box": [0, 0, 10, 10]}, SHAPE)
    with pytest.raises(PromptError, match="no prompt"):
        resolve_volume_prompts({}, SHAPE)
    prompt = box3d_prompt([4, 6, 2, 20, 30, 9], SHAPE)
    assert prompt.seed_slice == 5 and prompt.z_range == (2, 9)  # the middle of slices 2..8


def test_roi_forms_are_told_apart_or_refused_naming_both():
    # Slicer's interleaved pairs, one pair flipped by RAS -> IJK: only that reading fits
    assert roi_to_box3d([40, 10, 30, 5, 9, 2], SHAPE) == [10, 5, 2, 41, 31, 10]
    # corners [i0, j0, k0, i1, j1, k1]: read interleaved, the k pair (30, 40) leaves the 24 slices
    assert roi_to_box3d([10, 5, 2, 40, 30, 9], SHAPE) == [10, 5, 2, 41, 31, 10]
    with pytest.raises(PromptError, match=r"both as \[i0, i1, j0, j1, k0, k1\].*roi_layout"):
        roi_to_box3d([2, 3, 4, 10, 12, 14], SHAPE)
    assert roi_to_box3d([2, 3, 4, 10, 12, 14], SHAPE, "slicer") == [2, 4, 12, 4, 11, 15]
    assert roi_to_box3d([2, 3, 4, 10, 12, 14], SHAPE, "corners") == [2, 3, 4, 11, 13, 15]
    with pytest.raises(PromptError, match="outside the volume"):
        roi_to_box3d([100, 120, 0, 5, 0, 5], SHAPE)
    with pytest.raises(PromptError, match="roi_layout must be one of"):
        roi_to_box3d([2, 3, 4, 10, 12, 14], SHAPE, "ras")
    prompts = resolve_volume_prompts({"box3d": [[0, 0, 0, 5, 5, 3], [10, 10, 4, 20, 20, 9]]}, SHAPE)
    assert [p.z_range for p in prompts] == [(0, 3), (4, 9)]


def test_metrics_helpers():
    truth = cone()
    assert surface_dice(truth, truth, (1, 1, 2), 2.0) == 1.0
    shifted = np.roll(truth, 6, axis=0)
    assert 0 < surface_dice(shifted, truth, (1, 1, 2), 2.0) < 0.7
    assert surface_dice(np.zeros_like(truth), truth, (1, 1, 1), 2.0) == 0.0
    cut = truth.copy()
    cut[:, :, :6] = False
    assert end_gaps(cut, truth) == (3, 0)


@pytest.fixture(scope="module")
def session():
    return VolumePredictor(tiny_model(), encoder_engine="torch")


def test_session_encodes_each_slice_once_across_objects_and_calls(session):
    rng = np.random.default_rng(0)
    volume = (rng.random((48, 40, 7)) * 200 - 100).astype(np.float32)
    session.set_volume(volume, affine=np.diag([0.8, 0.8, 2.5, 1]), modality="mr")
    prompts = [box3d_prompt([5, 5, 0, 40, 35, 7], volume.shape), box3d_prompt([10, 10, 2, 30, 30, 5], volume.shape)]
    first = session.predict(prompts)
    assert first.labels.shape == first.probability.shape == first.uncertainty.shape == volume.shape
    assert first.encoder_calls == 7 and first.slices == [(0, 7), (2, 5)]
    assert set(np.unique(first.labels)) <= {0, 1, 2}
    again = session.predict(prompts)
    assert again.encoder_calls == 0
    np.testing.assert_array_equal(again.labels, first.labels)
    # the mask the session returns on the seed slice is the 2D model's on that slice with that box
    probability, _ = session.decode_slice(3, prompts[0].box)
    seed = (probability > 0.5).T
    np.testing.assert_array_equal((first.labels[:, :, 3] > 0) & seed, seed & (first.probability[:, :, 3] > 0.5))


def test_session_refuses_bad_volumes_and_names_the_nan_voxel(session):
    with pytest.raises(ImageReadError, match="3D scalar volume"):
        session.set_volume(np.zeros((4, 4, 4, 2), np.float32))
    with pytest.raises(ImageReadError, match="empty"):
        session.set_volume(np.zeros((4, 0, 4), np.float32))
    volume = np.zeros((32, 32, 4), np.float32)
    volume[3, 7, 2] = np.nan
    session.set_volume(volume, window=(0, 1))
    session.decode_slice(0, np.array([1, 1, 20, 20], np.float32))  # slice 0 is fine
    with pytest.raises(ImageReadError, match=r"\[3, 7, 2\]"):
        session.decode_slice(2, np.array([1, 1, 20, 20], np.float32))
