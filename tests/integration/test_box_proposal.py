"""The box-proposal head: boxes from its map, training on generated polyps, checkpoints, and ``--auto-box``."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_model
from imedsam.cli import main
from imedsam.data import box_from_mask, box_iou, synthetic_polyp
from imedsam.inference import Predictor
from imedsam.inference.predictor import image_to_tensor
from imedsam.losses import CoarseFineLoss, DiceBCELoss
from imedsam.networks import boxes_from_foreground, build_imedsam

pytestmark = pytest.mark.slow  # minutes: started first by tests/conftest.py


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges do not overlap


# -- boxes from a foreground map ------------------------------------------------------------------------------
def test_boxes_from_foreground_takes_the_most_confident_region_in_image_pixels():
    logits = torch.full((2, 1, 16, 16), -8.0)
    logits[0, 0, 2:6, 3:9] = 8.0  # a large confident region...
    logits[0, 0, 12:14, 12:14] = 8.0  # ...beats a small one
    logits[1, 0, 4:8, 4:8] = -1.0  # nothing above 0.5: the most likely region, with a low confidence
    proposal = boxes_from_foreground(logits, (1.0, 1.0), 160, 320, upsample=1)
    np.testing.assert_allclose(proposal.boxes[0], [3 * 20, 2 * 10, 9 * 20, 6 * 10])
    np.testing.assert_allclose(proposal.boxes[1], [4 * 20, 4 * 10, 8 * 20, 8 * 10])
    assert proposal.confidence[0] > 0.99 and proposal.confidence[1] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)))


def test_boxes_from_foreground_ignores_the_letterbox_padding():
    logits = torch.full((1, 1, 16, 16), -8.0)
    logits[0, 0, 1:4, 2:6] = 4.0
    logits[0, 0, 10:16, :] = 9.0  # in the padding below an image that fills the top half: never proposed
    proposal = boxes_from_foreground(logits, (0.5, 1.0), 100, 200, upsample=1)
    np.testing.assert_allclose(proposal.boxes[0], [2 / 16 * 200, 1 / 8 * 100, 6 / 16 * 200, 4 / 8 * 100])
    with pytest.raises(ValueError, match=r"\[B, 1, g, g\]"):
        boxes_from_foreground(torch.zeros(1, 2, 4, 4), (1.0, 1.0), 10, 10)


# -- the head in the model ----------------------------------------------------------------------------------
def test_training_forward_gives_the_head_its_loss_and_only_the_head_learns_from_it():
    model = tiny_model(lora_rank=2).train()
    image, boxes = torch.rand(2, 3, 64, 64), torch.tensor([[[8.0, 8, 40, 40]], [[20, 4, 60, 30]]])
    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, 4:20, 4:20] = 1
    target[1, 0, 2:15, 10:30] = 1
    out = model(image, boxes, (32, 32), return_all=True)
    assert out.proposal_logits.shape == (2, 1, 4, 4) and int(model.box_proposal.trained_steps) == 1
    with_head, without = CoarseFineLoss()(out, target), CoarseFineLoss(proposal_weight=0.0)(out, target)
    expected = DiceBCELoss()(F.interpolate(out.proposal_logits, size=(32, 32), mode="bilinear", align_corners=False), target)
    assert float(with_head - without) == pytest.approx(float(expected), rel=1e-5)
    expected.backward()
    assert model.box_proposal.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("box_proposal."))  # gradient stopped
    model.eval()
    with torch.no_grad():
        assert model(image, boxes, (32, 32), return_all=True).proposal_logits is None  # inference skips the head


def test_an_untrained_or_missing_head_is_refused_and_an_old_checkpoint_loads_without_one(tmp_path):
    model = tiny_model().eval()
    encoding = model.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="box-proposal head is untrained"):
        model.propose_boxes(encoding)
    with pytest.raises(RuntimeError, match="box_proposal=False"):
        tiny_model(box_proposal=False).propose_boxes(encoding)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("box_proposal.")}
    torch.save(old, tmp_path / "old.pt")
    reloaded = tiny_model().load_checkpoint(tmp_path / "old.pt")
    assert not reloaded.box_proposal.is_trained
    for key, value in old.items():
        assert torch.equal(reloaded.state_dict()[key], value)


# -- trained on generated polyps, used through the Predictor and the CLI -------------------------------------
@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """The pretrained lite_medsam with its head trained (on the frozen embedding) on 16 generated polyps."""
    torch.manual_seed(0)
    model = build_imedsam(lora_rank=0, fa_mode="none").eval()
    pictures = [synthetic_polyp((192, 256), seed=seed) for seed in range(20)]
    with torch.no_grad():
        encodings = [model.encode(image_to_tensor(image)) for image, _ in pictures]
    targets = []
    for encoding, (_, mask) in zip(encodings, pictures):
        framed = torch.zeros(1, 1, 256, 256)  # the mask in the encoder's letterboxed frame
        framed[0, 0, : encoding.height, : encoding.width] = torch.from_numpy(mask > 0).float()
        targets.append(framed)
    optimizer = torch.optim.AdamW(model.box_proposal.parameters(), lr=3e-3)
    loss_function = DiceBCELoss()
    model.box_proposal.train()
    for step in range(60):
        batch = [(step * 4 + k) % 16 for k in range(4)]
        logits = model.box_proposal(torch.cat([encodings[i].embedding for i in batch]))
        upsampled = F.interpolate(logits, size=(256, 256), mode="bilinear", align_corners=False)
        loss = loss_function(upsampled, torch.cat([targets[i] for i in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    checkpoint = tmp_path_factory.mktemp("proposal") / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"model": model, "pictures": pictures, "checkpoint": checkpoint}


def test_a_head_trained_on_generated_polyps_proposes_boxes_that_overlap_them(trained_model):
    predictor = Predictor(trained_model["model"])
    ious = []
    for image, mask in trained_model["pictures"][16:]:  # held out from the head's training
        predictor.set_image(image)
        box, confidence = predictor.propose_box()
        ious.append(box_iou(box, box_from_mask(mask > 0)))
        assert 0.0 <= confidence <= 1.0
        probability, _ = predictor.predict(box)
        truth = mask > 0
        dice = 2 * np.logical_and(probability > 0.5, truth).sum() / ((probability > 0.5).sum() + truth.sum())
        assert dice > 0.5, (box, box_from_mask(truth).tolist(), dice)
    assert min(ious) > 0.5, ious


def test_cli_auto_box_segments_without_a_box(trained_model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imedsam")
    image, mask = trained_model["pictures"][17]
    Image.fromarray(image).save(tmp_path / "image.png")
    code = main(["predict", "--image", str(tmp_path / "image.png"), "--auto-box", "--checkpoint", str(trained_model["checkpoint"]),
                 "--lora-rank", "0", "--fa-mode", "none", "--output", str(tmp_path / "mask.png")])  # fmt: skip
    assert code == 0
    assert "proposed box" in caplog.text
    predicted, truth = np.asarray(Image.open(tmp_path / "mask.png")) > 0, mask > 0
    assert 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum()) > 0.5

    caplog.clear()
    code = main(["predict", "--image", str(tmp_path / "image.png"), "--auto-box", "--weights", "none", "--output", str(tmp_path / "again.png")])
    assert code == 2 and "box-proposal head is untrained" in caplog.text  # LiteMedSAM's own weights have no trained head
    assert not (tmp_path / "again.png").exists()
    caplog.clear()
    # the default weight set (all_modalities) trained its head: it proposes a box
    assert main(["predict", "--image", str(tmp_path / "image.png"), "--auto-box", "--output", str(tmp_path / "set.png")]) == 0
    assert "proposed box" in caplog.text and (tmp_path / "set.png").is_file()


def test_box_proposal_report_scores_the_proposal_against_the_tight_box(trained_model, tmp_path):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "evaluate_box_proposal", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "scripts", "evaluate_box_proposal.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for index, (image, mask) in enumerate(trained_model["pictures"][16:19]):
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"p{index}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"p{index}.png")
    output = tmp_path / "report.md"
    args = ["--checkpoint", str(trained_model["checkpoint"]), "--dataset_dir", str(tmp_path / "data"), "--split", "all",
            "--lora_rank", "0", "--fa_mode", "none", "--output", str(output)]  # fmt: skip
    assert script.main(args) == 0
    row = output.read_text().splitlines()[2].split(" | ")
    assert row[1] == "3" and float(row[2]) > 0.5  # three images, mean box IoU
    dice_proposed, dice_tight, dice_whole = (float(v.strip(" |")) for v in row[5:8])
    assert dice_tight > 0.7 and dice_proposed > 0.5 and dice_tight >= dice_whole
    with pytest.raises(SystemExit):
        script.main(["--checkpoint", str(tmp_path / "missing.pt"), "--dataset_dir", str(tmp_path / "data")])
