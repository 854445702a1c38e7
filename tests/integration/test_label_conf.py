"""The MONAI Label app's ``--conf`` keys for the network, read without starting a server."""

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from conftest import import_app_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app_config():
    return import_app_module("lib.configs.imedsam")


def test_defaults_are_lite_medsam_decoded_adaptively_at_4096_points(app_config):
    overrides = app_config.network_overrides({})
    assert overrides["encoder"] == "lite_medsam" and overrides["image_size"] == 256
    assert overrides["decode_mode"] == "adaptive" and overrides["adaptive_points"] == 4096
    assert app_config.network_overrides({"encoder": "vit_b"})["image_size"] == 384


def test_adaptive_points_reach_the_network_the_app_builds(app_config):
    overrides = app_config.network_overrides({"encoder": "vit_tiny", "image_size": "64", "adaptive_points": "1024"})
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update(overrides)
    assert parser.get_parsed_content("network_def").decoder.adaptive_points == 1024


def test_the_volumetric_adapter_keys_build_the_slab_model_the_3d_task_serves(app_config):
    overrides = app_config.network_overrides({"encoder": "vit_tiny", "image_size": "64", "volumetric_adapter": "true",
                                              "slab_depth": "3", "volumetric_blocks": "last_half"})  # fmt: skip
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update(overrides)
    network = parser.get_parsed_content("network_def")
    assert network.slab_depth == 3 and sorted(network.image_encoder.volumetric_adapters.adapters) == ["2", "3"]
    assert app_config.network_overrides({})["volumetric_adapter"] is False
    with pytest.raises(ValueError, match="--conf slab_depth must be a positive whole number"):
        app_config.network_overrides({"slab_depth": "0"})


def test_the_decoder_lora_key_builds_the_click_model(app_config):
    overrides = app_config.network_overrides({"encoder": "vit_tiny", "image_size": "64", "decoder_lora_rank": "2"})
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.yaml"))
    parser.update(overrides)
    assert parser.get_parsed_content("network_def").prompt_path.decoder_lora is not None
    assert app_config.network_overrides({})["decoder_lora_rank"] == 0
    with pytest.raises(ValueError, match="--conf decoder_lora_rank must be a whole number of at least 0, got '-1'"):
        app_config.network_overrides({"decoder_lora_rank": "-1"})


@pytest.mark.parametrize("key, value", [("adaptive_points", "0"), ("adaptive_points", "many"), ("image_size", "-64")])
def test_a_bad_number_is_refused_with_its_key(app_config, key, value):
    with pytest.raises(ValueError, match=f"--conf {key} must be a positive whole number, got '{value}'"):
        app_config.network_overrides({key: value})


def test_writes_leave_no_temporary_file_and_a_killed_ones_are_removed_at_start(tmp_path):
    storage = import_app_module("lib.server.storage")
    storage.write_json_atomically(str(tmp_path / "train_stats.json"), {"name": "train_01"})
    (tmp_path / "imedsam.pt").write_bytes(b"old model")
    (tmp_path / "new.pt").write_bytes(b"new model")
    storage.copy_atomically(str(tmp_path / "new.pt"), str(tmp_path / "imedsam.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imedsam.pt", "new.pt", "train_stats.json"]
    assert (tmp_path / "imedsam.pt").read_bytes() == b"new model"
    # what kill -9 in the middle of a publish leaves, in this version's naming and the earlier one's
    (tmp_path / ".imedsam.pt.abc123.tmp").write_bytes(b"half a model")
    (tmp_path / "imedsam.pt.tmp").write_bytes(b"half a model")
    assert sorted(storage.remove_stale_temporaries(str(tmp_path))) == [".imedsam.pt.abc123.tmp", "imedsam.pt.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imedsam.pt", "new.pt", "train_stats.json"]


def test_the_request_body_limit_holds_the_largest_image_or_checkpoint_unless_max_request_mb_says(app_config, monkeypatch):
    body_limit = import_app_module("lib.server.body_limit")
    headers = import_app_module("imedsam.data.headers")
    mib = body_limit.MIB
    # the largest volume accepted (512 x 512 x 1024 float32 voxels, 1 GiB) and 64 MiB for the form around it
    assert app_config.conf_request_limit({}) == 1024 * mib + 64 * mib
    monkeypatch.setattr(headers, "MAX_IMAGE_VOXELS", 100 * mib)  # --conf max_image_voxels: the default follows
    assert app_config.conf_request_limit({}) == 400 * mib + 64 * mib

    class Tensor:  # what the limit reads of a tensor, without allocating 1.2 GiB
        def numel(self):
            return 600 * mib

        def element_size(self):
            return 2

    class Network:  # a served network whose checkpoint is larger than any image
        def state_dict(self):
            return {"big": Tensor()}

    assert app_config.conf_request_limit({}, Network()) == 1200 * mib + 64 * mib
    assert app_config.conf_request_limit({"max_request_mb": "5"}, Network()) == 5 * mib
    for value in ("0", "-1", "lots"):
        with pytest.raises(ValueError, match=f"--conf max_request_mb must be a positive whole number, got '{value}'"):
            app_config.conf_request_limit({"max_request_mb": value})


def test_a_weight_set_switches_on_its_prompts_and_an_unknown_one_is_refused(app_config, monkeypatch):
    from imedsam.networks import WEIGHT_SETS, WeightSet

    monkeypatch.setitem(WEIGHT_SETS, "test_set", WeightSet(file="x.pt", sha256="0", options={"modality_prompt": True}))
    overrides = app_config.network_overrides({"weights": "test_set"})
    assert overrides["weights"] == "test_set" and overrides["modality_prompt"] and not overrides["content_prompt"]
    with pytest.raises(ValueError, match="--conf weights 'nope': not a weight set of this package"):
        app_config.network_overrides({"weights": "nope"})
    with pytest.raises(ValueError, match="does not go with --conf encoder vit_b"):
        app_config.network_overrides({"weights": "test_set", "encoder": "vit_b"})
