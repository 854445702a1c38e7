"""The propagation against a plain statement of its rule, as test_decoder_reference.py holds the decoder to its maths.

``reference_propagation`` below restates ``imedsam.inference.volume``'s documented rule step by step, with no
code of the module: the seed slice, the next box (mask box, widened where the mask reached its box's edge), the
3D box's bounds, the stop tests of a walk with no z-range, the 3D clean-up and the most probable object winning.
A deterministic imperfect 2D model (it spills past its box, misses a rim, and sees a distractor) runs under both
on random scenes; every decoded slice, every box and every output voxel must agree.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from imedsam.inference import PropagationRule, VolumePredictor, box3d_prompt, slice_box_prompt

SHAPE = (48, 40, 18)  # (I, J, K): I is the picture's width (x), J its height (y)


def scene(rng):
    """Two ellipsoids of random size and place (objects 1 and 2) and a box-shaped distractor."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    objects = []
    for _ in range(2):
        centre = rng.uniform((12, 10, 5), (36, 30, 13))
        radii = rng.uniform((4, 4, 2.5), (12, 10, 7))
        objects.append(sum(((axis - c) / r) ** 2 for axis, c, r in zip((i, j, k), centre, radii)) <= 1)
    distractor = np.zeros(SHAPE, bool)
    x, y, z = rng.integers((0, 0, 0), (30, 24, 10))
    distractor[x : x + 18, y : y + 16, z : z + 8] = True
    return objects, distractor


def imperfect_model(truth, distractor, rng):
    """``(k, box) -> (probability, uncertainty)``, ``J x I``: what lies in the box grown by one voxel (a model
    that spills), less a random rim, with a slice-dependent confidence and uncertainty."""
    drop = rng.random(SHAPE) < 0.08
    confidence = rng.uniform(0.55, 0.99, SHAPE[2])
    noise = rng.uniform(0.0, 0.3, SHAPE[2])

    def decode(k, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        inside = np.zeros(SHAPE[1::-1], bool)
        inside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        seen = ((truth[:, :, k] | distractor[:, :, k]) & ~drop[:, :, k]).T & inside
        probability = np.where(seen, confidence[k], 0.05).astype(np.float32)
        uncertainty = np.where(seen, noise[k], 0.01).astype(np.float32)
        return probability, uncertainty

    return decode


def grow_by_one(mask):
    """``mask`` and its 4-neighbours in the slice."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def next_box(mask, answered_box, rule, width, height, xy_limit):
    rows, columns = np.nonzero(mask)
    box = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
    out = []
    for side in range(4):
        axis = side % 2
        length = box[axis + 2] - box[axis]
        # the mask reached the box's edge on this side: within touch voxels inside it, or past it
        inward = box[side] - answered_box[side] if side < 2 else answered_box[side] - box[side]
        reached = inward <= rule.touch
        widen = max(rule.margin * length, rule.min_margin) if reached else rule.min_margin
        out.append(box[side] - widen if side < 2 else box[side] + widen)
    out = [max(out[0], 0), max(out[1], 0), min(out[2], width), min(out[3], height)]
    if xy_limit is not None:
        bounded = [max(out[0], xy_limit[0]), max(out[1], xy_limit[1]), min(out[2], xy_limit[2]), min(out[3], xy_limit[3])]
        out = bounded if bounded[2] - bounded[0] >= 1 and bounded[3] - bounded[1] >= 1 else list(xy_limit)
    return out


def walk_goes_on(mask, probability, uncertainty, neighbour, seed_uncertainty, rule):
    area = mask.sum()
    return (
        area >= rule.min_area
        and (mask & grow_by_one(neighbour)).sum() >= rule.min_overlap * area
        and area <= rule.max_growth * max(neighbour.sum(), 1)
        and probability[mask].mean() >= rule.min_confidence
        and uncertainty[mask].mean() <= rule.max_uncertainty * max(seed_uncertainty, 1e-6)
    )


def reference_object(decode, box, seed, z_range, xy_limit, rule, calls):
    """One object's kept slices ``{k: (probability, uncertainty)}``; ``calls`` records every ``(k, box)`` decoded."""
    width, height, depth = SHAPE

    answers = {}

    def run(k, prompt_box):
        """Decode slice ``k`` with ``prompt_box``, once: a slice tried for the seed is not decoded again."""
        key = (k, tuple(float(v) for v in prompt_box))
        if key not in answers:
            calls.append((k, list(key[1])))
            answers[key] = decode(k, prompt_box)
        return answers[key]

    # a 3D box's seed: of its middle slice and the slices at the rule's fractions of its z-range, decoded with
    # its x/y extent, the one whose mask's box overlaps the extent most (IoU) times the mask's mean probability
    tried = [seed]
    if z_range is not None:
        fractions = [z_range[0] + f * (z_range[1] - 1 - z_range[0]) for f in rule.seed_candidates]
        tried += sorted({int(np.floor(v + 0.5)) for v in fractions} - {seed})
    best_fill = None
    for k in tried:
        probability, uncertainty = run(k, box)
        fill = box_fill(probability > 0.5, box) * probability[probability > 0.5].mean() if (probability > 0.5).any() else 0.0
        if best_fill is None or fill > best_fill:
            best_fill, seed, answer = fill, k, (probability, uncertainty)
    kept = {seed: answer}
    seed_mask = kept[seed][0] > 0.5
    seed_uncertainty = kept[seed][1][seed_mask].mean() if seed_mask.any() else 0.0
    if not seed_mask.any() and xy_limit is None:
        return kept
    low, high = z_range if z_range is not None else (0, depth)
    for step in (1, -1):
        neighbour, answered_box, k = seed_mask, box, seed + step
        while low <= k < high:
            if z_range is not None and not rule.box3d_follows_masks:
                prompt_box = list(xy_limit)  # a 3D box prompts every slice with its x/y extent
            elif neighbour.any():
                prompt_box = next_box(neighbour, answered_box, rule, width, height, xy_limit)
            elif xy_limit is not None:
                prompt_box = list(xy_limit)
            else:
                break
            probability, uncertainty = run(k, prompt_box)
            mask = probability > 0.5
            if z_range is None and not walk_goes_on(mask, probability, uncertainty, neighbour, seed_uncertainty, rule):
                break
            kept[k] = (probability, uncertainty)
            neighbour, answered_box, k = mask, prompt_box, k + step
    return seed, kept


def box_fill(mask, box):
    """The IoU of ``mask``'s box with ``box``."""
    rows, columns = np.nonzero(mask)
    x0, y0, x1, y1 = columns.min(), rows.min(), columns.max() + 1, rows.max() + 1
    overlap = max(min(x1, box[2]) - max(x0, box[0]), 0) * max(min(y1, box[3]) - max(y0, box[1]), 0)
    return overlap / ((x1 - x0) * (y1 - y0) + (box[2] - box[0]) * (box[3] - box[1]) - overlap)


def reference_propagation(decode, prompts, rule):
    """Labels ``(I, J, K)`` and the decoded ``(k, box)`` calls, for prompts ``(box, seed, z_range, xy_limit)``."""
    labels, best, calls = np.zeros(SHAPE, np.uint16), np.zeros(SHAPE, np.float32), []
    for number, (box, seed, z_range, xy_limit) in enumerate(prompts, start=1):
        seed, kept = reference_object(decode, box, seed, z_range, xy_limit, rule, calls)
        mask = np.zeros(SHAPE, bool)
        probability = np.zeros(SHAPE, np.float32)
        for k, (p, _) in kept.items():
            mask[:, :, k], probability[:, :, k] = p.T > 0.5, p.T
        # 3D clean-up: the 26-connected components that reach the seed slice's mask (all of them without one)
        components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        anchors = np.unique(components[:, :, seed][mask[:, :, seed]])
        if anchors.size:
            removed = mask & ~np.isin(components, anchors)
            probability[removed] = 0.0
        decoded = np.zeros(SHAPE, bool)
        decoded[:, :, sorted(kept)] = True
        wins = decoded & (probability > best)
        labels[wins] = np.where(probability[wins] > 0.5, number, 0)
        best[wins] = probability[wins]
    return labels, calls


class ModelSession(VolumePredictor):
    """The module's propagation around ``decode`` in place of a network, recording what it decodes."""

    def __init__(self, decode, rule):
        self.rule, self.calls, self._decode = rule, [], decode
        self._volume = np.zeros(SHAPE, np.float32)
        self.predictor = SimpleNamespace(encoder_calls=0)

    def decode_slice(self, k, box):
        self.calls.append((k, [float(v) for v in box]))
        return self._decode(k, box)


def tight_box(mask, k):
    columns, rows = np.nonzero(mask[:, :, k])
    return [float(columns.min()), float(rows.min()), float(columns.max() + 1), float(rows.max() + 1)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("protocol", ["box3d", "box3d_following_masks", "slice_box"])
def test_propagation_agrees_with_a_plain_statement_of_the_rule(seed, protocol):
    rng = np.random.default_rng(seed)
    objects, distractor = scene(rng)
    decode = imperfect_model(objects[0] | objects[1], distractor, rng)
    # min_confidence: some of the model's slices fall under it
    rule = PropagationRule(min_confidence=0.6, box3d_follows_masks=protocol == "box3d_following_masks")
    prompts, reference_prompts = [], []
    for mask in objects:
        ks = np.nonzero(mask.any(axis=(0, 1)))[0]
        if protocol.startswith("box3d"):
            i, j = np.nonzero(mask.any(axis=2))
            box3d = [i.min(), j.min(), ks[0], i.max() + 1, j.max() + 1, ks[-1] + 1]
            prompts.append(box3d_prompt(box3d, SHAPE))
            xy = [float(v) for v in (box3d[0], box3d[1], box3d[3], box3d[4])]
            reference_prompts.append((xy, (ks[0] + ks[-1]) // 2, (ks[0], ks[-1] + 1), xy))
        else:
            k = int(ks[len(ks) // 2])
            prompts.append(slice_box_prompt(tight_box(mask, k), k, SHAPE))
            reference_prompts.append((tight_box(mask, k), k, None, None))
    # the middle slice of the z-range, the lower of two (the CVPR 2024 recipe: z_min + (z_max - z_min) // 2, z_max inclusive)
    assert [p.seed_slice for p in prompts] == [int(r[1]) for r in reference_prompts]

    expected, expected_calls = reference_propagation(decode, reference_prompts, rule)
    session = ModelSession(decode, rule)
    result = session.predict(prompts)

    assert len(session.calls) == len(expected_calls)
    for (k, box), (k_ref, box_ref) in zip(session.calls, expected_calls):
        assert k == k_ref
        np.testing.assert_allclose(box, box_ref, atol=1e-4)
    np.testing.assert_array_equal(result.labels, expected)
    assert (expected > 0).any()


def test_an_empty_seed_slice_inside_a_3d_box_keeps_what_the_walk_found():
    """The seed's mask anchors the clean-up; a 3D box whose middle slice the model misses has no anchor, and
    every component the walk found is kept, one or several."""
    truth = np.zeros(SHAPE, bool)
    truth[10:20, 10:20, 2:7] = True
    truth[30:40, 25:35, 10:16] = True
    prompt = box3d_prompt([5, 5, 2, 45, 38, 16], SHAPE)
    hidden = np.zeros(SHAPE, bool)
    hidden[:, :, prompt.seed_slice] = True  # the model sees nothing on the middle slice
    decode = imperfect_model(truth & ~hidden, np.zeros(SHAPE, bool), np.random.default_rng(0))
    session = ModelSession(decode, PropagationRule(seed_candidates=()))  # the middle slice seeds
    found = session.predict([prompt]).labels > 0
    assert session.calls[0][0] == prompt.seed_slice and not found[:, :, prompt.seed_slice].any()
    assert found[truth & ~hidden].mean() > 0.8  # both boxes, each a component of its own
