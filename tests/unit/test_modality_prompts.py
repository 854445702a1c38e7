"""MCP-MedSAM's modality and content prompts: exact warm start, gradients, one modality per image, checkpoints."""

import pytest
import torch

from imedsam.engine import parameter_groups
from imedsam.networks import Prompts, build_imedsam
from imedsam.networks.prompts import ANY_MODALITY, MODALITY_NAMES

BOXES = torch.tensor([[[8.0, 10, 40, 44], [20, 5, 60, 30]], [[4.0, 4, 30, 50], [30, 30, 62, 62]]])


def _model(**prompts):
    torch.manual_seed(0)
    return build_imedsam("vit_tiny", image_size=64, box_proposal=False, mc_samples_train=2, **prompts)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prompts", [{"modality_prompt": True}, {"content_prompt": True}, {"modality_prompt": True, "content_prompt": True}])
def test_untrained_prompts_leave_the_mask_bit_for_bit_and_train_from_the_first_step(images, prompts):
    plain = _model().eval()
    prompted = _model(**prompts)
    prompted.load_state_dict(plain.state_dict(), strict=False)
    prompted.eval()
    with torch.no_grad():
        before = plain(images, BOXES)
        assert torch.equal(prompted(images, Prompts(boxes=BOXES, modality=["ct", "endoscopy"])), before)
    prompted.train()
    out = prompted(images, Prompts(boxes=BOXES, modality="mr"), return_all=True)
    out.logits.square().mean().backward()
    gates = prompted.prompt_path.token_gates.weight
    assert gates.grad.abs().sum() > 0  # the gates learn at once ...
    tokens = [p for n, p in prompted.named_parameters() if "modality_prompt" in n or "content_prompt" in n]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tokens)  # ... the tokens once the gates are open
    with torch.no_grad():
        gates.fill_(0.3)
    prompted.zero_grad()
    prompted(images, Prompts(boxes=BOXES, modality="mr"), return_all=True).logits.square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in tokens)
    prompted.eval()
    with torch.no_grad():
        assert not torch.equal(prompted(images, BOXES), before)


def test_each_image_gets_its_own_modality_token_and_an_unknown_one_is_refused(images):
    model = _model(modality_prompt=True).eval()
    with torch.no_grad():
        model.prompt_path.token_gates.weight.fill_(0.5)
        model.prompt_path.modality_prompt.trained_images.fill_(1)  # as if every token had trained
        ct_mr = model(images, Prompts(boxes=BOXES, modality=["ct", "mr"]))
        ct_ct = model(images, Prompts(boxes=BOXES, modality="ct"))
        unknown = model(images, BOXES)  # no modality: the "any" token
        any_any = model(images, Prompts(boxes=BOXES, modality=[None, None]))
    assert torch.equal(ct_mr[0], ct_ct[0]) and not torch.equal(ct_mr[1], ct_ct[1])
    assert torch.equal(unknown, any_any) and not torch.equal(unknown, ct_ct)
    with pytest.raises(ValueError, match="unknown modality 'MRI'.*ct, mr"):
        model(images, Prompts(boxes=BOXES, modality="MRI"))
    with pytest.raises(ValueError, match="3 names for 2 images"):
        Prompts(boxes=BOXES, modality=["ct", "mr", "us"])
    assert len(MODALITY_NAMES) == 11


def test_modality_dropout_trains_the_any_token():
    model = _model(modality_prompt=True)
    prompt = model.prompt_path.modality_prompt
    rows = prompt.indices(["ct"] * 2000)
    model.train()
    drawn = (prompt(rows) == prompt.tokens.weight[prompt.any_index]).all(dim=1).float().mean().item()
    assert 0.07 < drawn < 0.13  # the default rate, 0.1
    model.eval()
    assert torch.equal(prompt(rows), prompt.tokens.weight[rows])


def test_a_checkpoint_without_the_prompts_loads_and_keeps_their_gates_shut(tmp_path, images):
    plain = _model()
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    prompted = _model(modality_prompt=True, content_prompt=True).load_checkpoint(path).eval()
    assert prompted.prompt_path.token_gates.weight.abs().sum() == 0
    with torch.no_grad():
        assert torch.equal(prompted(images, BOXES), plain.eval()(images, BOXES))
    # and the prompts train at the decoder's learning rate, as the other parts that start untrained
    groups = parameter_groups(prompted, 1e-3, 0.1)
    full_rate = {id(p) for p in groups[0]["params"]}
    assert all(id(p) in full_rate for n, p in prompted.named_parameters() if n.startswith("prompt_path.token_gates"))
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)


def test_any_names_the_any_token_and_other_strings_are_still_refused():
    prompt = _model(modality_prompt=True).prompt_path.modality_prompt
    assert ANY_MODALITY == "any" and "any" not in MODALITY_NAMES
    assert prompt.indices(["any", None, "ct"]).tolist() == [prompt.any_index, prompt.any_index, 0]
    with pytest.raises(ValueError, match="unknown modality 'Any'"):
        prompt.indices(["Any"])


def test_a_modality_whose_token_never_trained_gets_the_any_token(images):
    model = _model(modality_prompt=True)
    prompt = model.prompt_path.modality_prompt
    prompt.dropout = 0.0
    model.train()
    model(images, Prompts(boxes=BOXES, modality=["ct", "mr"]), return_all=True)
    seen = {name for name, count in zip((*MODALITY_NAMES, "any"), prompt.trained_images.tolist()) if count}
    assert seen == {"ct", "mr"}
    model.eval()
    with torch.no_grad():
        model.prompt_path.token_gates.weight.fill_(0.5)
        untrained = model(images, Prompts(boxes=BOXES, modality="us"))
        assert torch.equal(untrained, model(images, BOXES))  # ultrasound never trained: "any"
        assert not torch.equal(model(images, Prompts(boxes=BOXES, modality="ct")), untrained)
