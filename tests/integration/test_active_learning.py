"""Active learning: the uncertainty scores, the selection rules, and scripts/active_learning.py end to end."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from imedsam.active_learning import score_images, scoring_box, select_images, simulate_active_learning
from imedsam.data import polyp_datalist, write_synthetic_dataset
from imedsam.evaluation import BundleRunner, EmbeddingRunner
from imedsam.metrics import ENTROPY_FLOOR, mc_dropout_entropy, ugs_score

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location("active_learning_script", os.path.join(ROOT, "scripts", "active_learning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- scores -----------------------------------------------------------------------------------------------
def test_ugs_score_averages_over_the_prediction_in_the_box_else_over_the_box():
    variance = np.arange(36, dtype=np.float32).reshape(6, 6)
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:3, 1:3] = True
    mask[5, 5] = True  # outside the box: ignored
    assert ugs_score(variance, mask, [1, 1, 4, 4]) == pytest.approx(variance[1:3, 1:3].mean())
    assert ugs_score(variance, np.zeros((6, 6)), [1, 1, 4, 4]) == pytest.approx(variance[1:4, 1:4].mean())
    # a box reaching past the map is clipped to it; torch inputs work alike
    assert ugs_score(torch.from_numpy(variance), torch.from_numpy(mask), [-3, -3, 3, 3]) == pytest.approx(variance[1:3, 1:3].mean())


@pytest.mark.parametrize(
    "uncertainty, mask, box, message",
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), [0, 0, 2, 2], "one shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), [5, 5, 8, 8], "no pixel inside"),
        (np.zeros((4, 4)), np.zeros((4, 4)), [2, 2, 2, 3], "no pixel inside"),
    ],
)
def test_ugs_score_rejects_bad_inputs(uncertainty, mask, box, message):
    with pytest.raises(ValueError, match=message):
        ugs_score(uncertainty, mask, box)


def _monai_label_entropy(passes: np.ndarray) -> float:
    """MONAI Label's own epistemic score of T x H x W passes, as EpistemicScoring computes it."""
    from monailabel.tasks.scoring.epistemic import EpistemicScoring

    # entropy_3d_volume reads nothing from self; it changes its input in place, so hand it a copy
    return float(np.nanmean(EpistemicScoring.entropy_3d_volume(None, passes.copy())))


@pytest.mark.parametrize(
    "passes",
    [
        np.stack([np.full((3, 3), 0.2), np.full((3, 3), 0.6)]),
        np.stack([np.eye(3), np.eye(3)]),  # p = 0 is floored per pass before the average
        np.stack([np.full((2, 4), 1e-6), np.full((2, 4), 1e-6)]),  # tiny but positive: kept, not floored
        np.stack([np.zeros((2, 4)), np.full((2, 4), 1e-6), np.full((2, 4), 0.3)]),
        np.random.default_rng(0).random((5, 16, 12)).astype(np.float32),
    ],
)
def test_mc_dropout_entropy_is_monai_labels_epistemic_score(passes):
    assert mc_dropout_entropy(passes) == pytest.approx(_monai_label_entropy(passes), rel=1e-6)


def test_mc_dropout_entropy_values_and_errors():
    passes = np.stack([np.full((3, 3), 0.2), np.full((3, 3), 0.6)])
    assert mc_dropout_entropy(passes) == pytest.approx(-0.4 * np.log(0.4))
    # where the passes agree on 0 each is floored first: (6 pixels at the floor, 3 at p = 1) / 9
    certain = np.stack([np.eye(3), np.eye(3)])
    assert mc_dropout_entropy(certain) == pytest.approx(6 * (-ENTROPY_FLOOR * np.log(ENTROPY_FLOOR)) / 9)
    # p = 1e-6 stays 1e-6 (flooring the mean instead would give a score about 36 times larger)
    assert mc_dropout_entropy(np.full((2, 2, 2), 1e-6)) == pytest.approx(-1e-6 * np.log(1e-6), rel=1e-5)
    with pytest.raises(ValueError, match="T >= 2"):
        mc_dropout_entropy(np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="sigmoid"):
        mc_dropout_entropy(np.full((2, 3, 3), 2.0))


# -- selection ----------------------------------------------------------------------------------------------
def test_select_images_by_score_and_at_random():
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.5}
    assert select_images("ugs", list(scores), 3, scores) == ["b", "c", "d"]
    assert select_images("epistemic", ["a", "d"], 1, scores) == ["d"]
    first = select_images("random", list(scores), 2, rng=np.random.default_rng(3))
    assert first == select_images("random", list(scores)[::-1], 2, rng=np.random.default_rng(3))
    assert len(set(first)) == 2 and set(first) <= set(scores)
    draws = {tuple(select_images("random", list(scores), 2, rng=np.random.default_rng(seed))) for seed in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize(
    "strategy, k, scores, rng, message",
    [
        ("greedy", 1, None, None, "strategy must be one of"),
        ("ugs", 5, {"a": 1, "b": 2}, None, "cannot pick 5 of 2"),
        ("ugs", 0, {"a": 1, "b": 2}, None, "cannot pick 0"),
        ("ugs", 1, {"a": 1}, None, "a score for every unlabeled image"),
        ("random", 1, None, None, "needs rng"),
    ],
)
def test_select_images_rejects_bad_requests(strategy, k, scores, rng, message):
    with pytest.raises(ValueError, match=message):
        select_images(strategy, ["a", "b"], k, scores, rng)


def _items(count=3, size=64):
    generator = torch.Generator().manual_seed(5)
    return [
        {"image": torch.rand(3, size, size, generator=generator), "box": torch.tensor([[8.0 + i, 10.0, 40.0, 50.0 - i]]), "name": f"img{i}"}
        for i in range(count)
    ]


def test_score_images_ugs_is_the_ugs_score_of_the_models_own_maps():
    model = tiny_model()
    items = _items()
    scores = score_images(model, items, "ugs", label_size=32)
    model.eval()
    with torch.no_grad():
        for item in items:
            out = model(item["image"][None], item["box"][None], (32, 32), return_all=True)
            expected = ugs_score(out.uncertainty[0, 0], out.logits[0, 0] > 0, (item["box"][0] * 0.5).tolist())
            assert scores[item["name"]] == pytest.approx(expected)
    assert scores == score_images(model, items, "ugs", label_size=32)  # eval mode: deterministic


def test_score_images_epistemic_samples_dropout_and_leaves_the_model_as_it_was():
    model = tiny_model().train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    items = _items(2)
    torch.manual_seed(11)
    scores = score_images(model, items, "epistemic", label_size=24, mc_passes=4)
    assert model.training  # restored
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed while scoring"  # BatchNorm statistics included
    # the same draws by hand: eval mode except the decoder's dropout, four sigmoid maps per image
    torch.manual_seed(11)
    model.eval()
    model.decoder.train()
    for module in model.decoder.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        for item in items:
            encoding = model.encode(item["image"][None])
            passes = [torch.sigmoid(model.decode(encoding, item["box"][None], (24, 24))[0, 0]) for _ in range(4)]
            assert scores[item["name"]] == mc_dropout_entropy(torch.stack(passes))
            assert not torch.equal(passes[0], passes[1])
    model.train()
    again = score_images(model, items, "epistemic", label_size=24, mc_passes=4)
    assert again != scores  # the passes draw fresh dropout masks
    with pytest.raises(ValueError, match="method must be one of"):
        score_images(model, items, "random", label_size=24)


# -- the simulation through the bundle ---------------------------------------------------------------------
def test_active_learning_script_runs_rounds_and_ugs_picks_the_most_uncertain(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, count=12, size=(48, 48), fractions=(0.6, 0.2))
    work, output = tmp_path / "work", tmp_path / "out" / "al.csv"
    args = [
        "--dataset_dir", str(data), "--split_file", str(data / "split.json"), "--seeds", "0", "1", "--seed_size", "2",
        "--query_size", "2", "--rounds", "1", "--steps", "1", "--mc_passes", "2", "--image_size", "32", "--label_size", "16",
        "--batch_size", "2", "--work_dir", str(work), "--output", str(output), "--full_pool",
    ]
    assert _script().main(args) == 0

    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    full = [r for r in rows if r["strategy"] == "full_pool"]
    rows = [r for r in rows if r["strategy"] != "full_pool"]
    assert len(rows) == 2 * 4 * 2  # seeds x strategies x (seed round + 1 round)
    assert [(r["seed"], r["labeled"]) for r in full] == [("0", "7"), ("1", "7")]  # once per seed, on the whole pool
    for seed in ("0", "1"):
        first = [r for r in rows if r["seed"] == seed and r["round"] == "0"]
        assert len({(r["test_dice"], r["labeled"]) for r in first}) == 1  # one seed-set model serves every strategy
        for strategy in ("ugs", "ugs_whole_image", "epistemic", "random"):
            ours = [r for r in rows if r["seed"] == seed and r["strategy"] == strategy]
            assert [int(r["labeled"]) for r in ours] == [2, 4]
            # each row reports the test evaluation of its own round's model
            for row in ours:
                run_dir = work / f"seed{seed}" / ("round0" if row["round"] == "0" else f"{strategy}/round{row['round']}")
                with open(run_dir / "eval" / "per_image.csv", newline="") as f:
                    per_image = [float(r["dice"]) for r in csv.DictReader(f)]
                assert len(per_image) == len(json.loads((data / "split.json").read_text())["test"])
                assert float(row["test_dice"]) == pytest.approx(np.mean(per_image))
    selections = json.loads((work / "selections.json").read_text())
    split = json.loads((data / "split.json").read_text())
    pool = {os.path.splitext(name)[0] for name in split["train"]}
    for record in selections.values():
        picked = record["seed_set"] + [name for added in record["rounds"] for name in added]
        assert len(picked) == len(set(picked)) == 4 and set(picked) <= pool

    # Round 1 of ugs took the two highest UGS scores of the seed-set model, in the boxes its head proposes.
    runner = BundleRunner(os.path.join(ROOT, "bundle"), str(data), {"encoder": "vit_tiny", "image_size": 32, "label_size": 16, "batch_size": 2})
    record = selections["seed0/ugs"]
    unlabeled = sorted(pool - set(record["seed_set"]))
    items = runner.preprocess([i for i in polyp_datalist(str(data), "train", str(data / "split.json")) if i["name"] in unlabeled])
    network = runner.load_network(str(work / "seed0" / "round0" / "models" / "model.pt"))
    assert network.box_proposal.is_trained  # the bundle's training trains the head
    scores = score_images(network, items, "ugs", 16, box_source="proposed")
    assert record["rounds"][0] == select_images("ugs", unlabeled, 2, scores)
    whole = score_images(network, items, "ugs", 16, box_source="whole_image")
    assert selections["seed0/ugs_whole_image"]["rounds"][0] == select_images("ugs_whole_image", unlabeled, 2, whole)

    png = output.with_suffix(".png")
    with Image.open(png) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    summary = output.with_suffix(".md").read_text()
    assert "| labeled | ugs | ugs_whole_image | epistemic | random |" in summary and "| 4 |" in summary
    assert "box filled" in summary and "scripts/active_learning.py" in summary
    assert "Random selection's final mean Dice (test_dice)" in summary and "- ugs " in summary
    assert "the whole pool (7 images), same budget" in summary and "| 7 |" not in summary
    assert "round 1" in capsys.readouterr().out

    # a study run in parts (here: one file per seed) gives the same summary once combined
    with open(output, newline="") as f:
        everything = list(csv.DictReader(f))
    parts = []
    for seed in ("0", "1"):
        part = tmp_path / f"seed{seed}.csv"
        with open(part, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(everything[0]))
            writer.writeheader()
            writer.writerows(r for r in everything if r["seed"] == seed)
        parts.append(str(part))
    combined = tmp_path / "combined" / "al.csv"
    base = ["--dataset_dir", str(data), "--split_file", str(data / "split.json"), "--label_size", "16"]
    assert _script().main([*base, "--combine", *parts, "--output", str(combined)]) == 0
    tables = [text.split("Command:")[0] for text in (summary, combined.with_suffix(".md").read_text())]
    assert tables[0] == tables[1]
    with pytest.raises(ValueError, match="in both"):
        _script().main([*base, "--combine", parts[0], parts[0], "--output", str(tmp_path / "twice.csv")])


def test_simulation_refuses_a_small_pool_an_unknown_strategy_and_an_earlier_study(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, count=6, size=(32, 32), fractions=(0.5, 0.2))
    runner = BundleRunner(os.path.join(ROOT, "bundle"), str(data), {"encoder": "vit_tiny", "image_size": 32, "label_size": 16})
    with pytest.raises(ValueError, match="the pool has 3"):
        simulate_active_learning(runner, str(data / "split.json"), str(tmp_path / "work"), seed_size=2, query_size=1, rounds=2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        simulate_active_learning(runner, str(data / "split.json"), str(tmp_path / "work"), strategies=["ugs", "entropy"])
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.csv").write_text("seed,strategy\n0,ugs\n")
    with pytest.raises(FileExistsError, match="earlier study"):
        simulate_active_learning(runner, str(data / "split.json"), str(earlier), seed_size=1, query_size=1, rounds=1)
    assert (earlier / "results.csv").read_text() == "seed,strategy\n0,ugs\n"  # kept as it was


def test_active_learning_script_names_a_missing_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _script().main(["--dataset_dir", str(tmp_path / "nowhere"), "--split_file", str(tmp_path / "split.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "not found" in err and "nowhere" in err
    write_synthetic_dataset(tmp_path / "data", count=3, size=(32, 32))
    with pytest.raises(SystemExit) as stop:
        _script().main([
            "--dataset_dir", str(tmp_path / "data"), "--split_file", str(tmp_path / "data" / "split.json"),
            "--initial_checkpoint", str(tmp_path / "missing.pt"), "--work_dir", str(tmp_path / "work"),
        ])
    assert stop.value.code == 2 and "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing started


# -- the embedding runner: frozen encoder, cached embeddings ----------------------------------------------
EMBEDDING_OVERRIDES = {"encoder": "vit_tiny", "image_size": 32, "label_size": 16, "batch_size": 2, "lora_rank": 0, "fa_mode": "none",
                       "freeze_sam": True, "learning_rate": 1e-2}  # fmt: skip


def test_embedding_runner_trains_only_after_the_encoder_and_restarts_every_training(tmp_path):
    data, cross = tmp_path / "data", tmp_path / "cross"
    write_synthetic_dataset(data, count=10, size=(48, 40), fractions=(0.6, 0.2))
    write_synthetic_dataset(cross, count=3, size=(36, 52), seed=4)
    with pytest.raises(ValueError, match="encoder must be frozen"):
        EmbeddingRunner(os.path.join(ROOT, "bundle"), str(data), {**EMBEDDING_OVERRIDES, "lora_rank": 2})
    runner = EmbeddingRunner(os.path.join(ROOT, "bundle"), str(data), EMBEDDING_OVERRIDES, str(cross), train_label_size=16, query_size=8)
    encoder = {k: v.clone() for k, v in runner.network.image_encoder.state_dict().items()}
    split = json.loads((data / "split.json").read_text())
    checkpoint, _ = runner.train({**split, "train": split["train"][:4]}, str(tmp_path / "a"), steps=3, seed=1)
    state = torch.load(checkpoint, weights_only=True)
    assert state and all(k.startswith(("decoder.", "box_proposal.", "prompt_path.")) for k in state)
    assert int(state["box_proposal.trained_steps"]) == 3
    assert any(not torch.equal(state[k], runner.initial_state[k]) for k in state if k.startswith("decoder."))
    for key, value in runner.network.image_encoder.state_dict().items():
        assert torch.equal(value, encoder[key])
    # the same labeled set and seed give the same model: each training starts again from the initial weights
    again, _ = runner.train({**split, "train": split["train"][:4]}, str(tmp_path / "b"), steps=3, seed=1)
    for key, value in torch.load(again, weights_only=True).items():
        assert torch.equal(value, state[key]), key

    summary = runner.evaluate(checkpoint, str(tmp_path / "a" / "split.json"), str(tmp_path / "a"))
    assert summary["dice"]["count"] == len(split["test"]) and summary["cross_dice"]["count"] == 3
    with open(tmp_path / "a" / "eval" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(split["test"]) + 3
    tests = [float(r["dice"]) for r in rows if not r["name"].startswith("cross:")]
    assert summary["dice"]["mean"] == pytest.approx(np.mean(tests))


def test_scoring_boxes_given_whole_image_and_proposed(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, count=6, size=(40, 60), fractions=(0.6, 0.2))
    runner = EmbeddingRunner(os.path.join(ROOT, "bundle"), str(data), EMBEDDING_OVERRIDES)
    item = runner.preprocess(polyp_datalist(str(data), "train", str(data / "split.json"))[:1])[0]
    assert item["extent"] == pytest.approx((21 / 32, 1.0))  # 40 x 60 letterboxed into 32: 21 rows of 32
    assert scoring_box(runner.network, item, "given").tolist() == item["box"].reshape(1, 4).tolist()
    assert scoring_box(runner.network, item, "whole_image").tolist() == [[0.0, 0.0, 32.0, 21.0]]
    with pytest.raises(RuntimeError, match="untrained"):
        scoring_box(runner.network, item, "proposed")
    runner.network.box_proposal.trained_steps.fill_(1)
    x0, y0, x1, y1 = scoring_box(runner.network, item, "proposed")[0].tolist()
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 21  # inside the image, never in the padding
    with pytest.raises(ValueError, match="box source"):
        scoring_box(runner.network, item, "center")
