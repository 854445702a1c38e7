"""The MONAI bundle, run the way users run it: python -m monai.bundle ... on generated data."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from imedsam.data import polyp_datalist, write_synthetic_dataset
from imedsam.networks import IMedSAMBoxMask, build_imedsam

pytestmark = pytest.mark.slow  # minutes: started first by tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "bundle", "configs")
TRAIN, EVALUATE = os.path.join(CONFIGS, "train.yaml"), os.path.join(CONFIGS, "evaluate.yaml")
INFERENCE_OVERLAY, MULTI_GPU = os.path.join(CONFIGS, "inference.yaml"), os.path.join(CONFIGS, "multi_gpu_train.yaml")
EVALUATE_VOLUME = os.path.join(CONFIGS, "evaluate_volume.yaml")
INFERENCE = f"['{TRAIN}','{INFERENCE_OVERLAY}']"  # inference.yaml is an overlay on train.yaml, which holds the network
META = os.path.join(CONFIGS, "metadata.json")
SCHEMA = os.path.join(ROOT, "..", "shared", "reference", "bundle_meta_schema_20240725.json")
SMALL = ["--encoder", "vit_tiny", "--image_size", "64", "--batch_size", "2", "--max_epochs", "1"]


def bundle(*args, cwd=ROOT, runner=(sys.executable, "-m", "monai.bundle"), timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([*runner, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def folders(tmp) -> list[str]:
    return ["--dataset_dir", str(tmp / "data"), "--ckpt_dir", str(tmp / "models"), "--output_dir", str(tmp / "eval")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of training through `run training`, on the demo data the bundle writes itself."""
    tmp = tmp_path_factory.mktemp("bundle")
    write_synthetic_dataset(tmp / "data", count=8, size=(64, 80))
    log = ok(bundle("run", "training", "--config_file", TRAIN, *SMALL, "--label_size", "64", *folders(tmp)))
    return tmp, log


def test_run_training_form_trains_and_saves_a_plain_state_dict(trained):
    tmp, log = trained
    assert "val_mean_dice" in log
    state = torch.load(tmp / "models" / "model.pt", weights_only=True)
    model = build_imedsam("vit_tiny", image_size=64, freeze_sam=False)
    assert set(state) == set(model.state_dict())
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp / "eval" / "tensorboard"))


def test_run_form_trains_too_and_generates_missing_demo_data(tmp_path):
    demo = tmp_path / "demo"
    args = ["--demo_dataset_dir", str(demo), "--dataset_dir", str(demo), "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "e")]
    log = ok(bundle("run", "--config_file", TRAIN, *SMALL, "--label_size", "48", *args))
    assert "writing the synthetic demo dataset" in log
    assert (demo / "split.json").is_file() and (tmp_path / "m" / "model.pt").is_file()


def test_training_decodes_a_half_size_sub_lattice_by_default_and_every_pixel_on_request(tmp_path):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"encoder": "vit_tiny", "label_size": 48})
    inferer = parser.get_parsed_content("train#inferer")
    assert inferer.query_size == 24 and inferer.output_size == (48, 48)
    # the `trained` fixture runs the default; here the command line asks for every pixel (monai.bundle drops
    # a None override, so "every pixel" is the grid's own size)
    write_synthetic_dataset(tmp_path / "data", count=6, size=(64, 64))
    log = ok(bundle("run", "training", "--config_file", TRAIN, *SMALL, "--label_size", "48", "--train_query_size", "48",
                    *folders(tmp_path)))
    assert "train_query_size: 48" in log and "val_mean_dice" in log and (tmp_path / "models" / "model.pt").is_file()


def test_click_prob_trains_the_click_embeddings_and_validation_still_prompts_boxes(tmp_path):
    from monai.bundle import ConfigParser

    write_synthetic_dataset(tmp_path / "data", count=6, size=(64, 64))
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"encoder": "vit_tiny", "image_size": 64, "label_size": 48, "max_epochs": 1, "click_prob": 1.0,
                   "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "models"),
                   "output_dir": str(tmp_path / "eval")})  # fmt: skip
    parser.get_parsed_content("initialize")  # set_determinism, as `run training` does first
    trainer = parser.get_parsed_content("train#trainer")
    encoder = parser.get_parsed_content("network").prompt_path.prompt_encoder
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    trainer.run()
    after = dict(encoder.named_parameters())
    assert not torch.equal(after["point_embeddings.1.weight"], before["point_embeddings.1.weight"])  # clicks trained it
    assert torch.equal(after["point_embeddings.2.weight"], before["point_embeddings.2.weight"])  # no batch had a box
    assert parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"] >= 0  # validated on boxes


def test_the_network_is_defined_once_in_train_yaml():
    train = ConfigParser.load_config_file(TRAIN)
    network_keys = {"network_kwargs", "network_def", "export_network_def", *(ref[1:] for ref in train["network_kwargs"].values())}
    assert {"encoder", "image_size", "use_inr", "decode_mode", "adaptive_points", "mask_prior"} <= network_keys
    for overlay in (EVALUATE, INFERENCE_OVERLAY, MULTI_GPU, EVALUATE_VOLUME):
        # evaluate_volume.yaml only chooses the adaptive decoding, the volumes' default
        allowed = {"decode_mode"} if overlay == EVALUATE_VOLUME else set()
        assert set(ConfigParser.load_config_file(overlay)) & network_keys <= allowed, overlay


@pytest.mark.parametrize("config", [TRAIN, [TRAIN, INFERENCE_OVERLAY]], ids=["train", "inference"])
def test_adaptive_points_reach_the_decoder_from_the_command_line_keys(config):
    parser = ConfigParser()
    parser.read_config(config)
    parser.update({"encoder": "vit_tiny", "image_size": 64, "adaptive_points": 1024})
    assert parser.get_parsed_content("network_def").decoder.adaptive_points == 1024
    parser.update({"adaptive_points": 0})
    with pytest.raises(RuntimeError) as refused:  # monai.bundle's wrapper around the network's own error
        parser.get_parsed_content("network_def", lazy=False)
    assert "adaptive_points must be positive" in str(refused.value.__cause__)


def test_evaluate_at_another_label_size_writes_csv_summary_and_overlays(trained):
    tmp, _ = trained
    out = tmp / "eval96"
    log = ok(bundle("run", "--config_file", f"['{TRAIN}','{EVALUATE}']", *SMALL, "--label_size", "96",
                    *folders(tmp)[:4], "--output_dir", str(out), "--overlays", "1"))
    summary = json.loads((out / "summary.json").read_text())
    test_names = json.loads((tmp / "data" / "split.json").read_text())["test"]
    assert summary["count"] == len(test_names) and summary["label_size"] == 96
    for metric in ("dice", "iou", "hd95", "boundary_iou"):
        assert set(summary[metric]) == {"mean", "std"}
    rows = (out / "per_image.csv").read_text().strip().splitlines()
    assert rows[0] == "name,dice,iou,hd95,boundary_iou" and len(rows) == 1 + len(test_names)
    assert rows[1].startswith(os.path.splitext(test_names[0])[0])
    overlay = np.asarray(Image.open(next((out / "overlays").iterdir())))
    assert overlay.shape == (96, 192, 3)  # prediction panel + uncertainty panel at the label size
    assert "evaluated" in log


def test_evaluate_without_a_checkpoint_names_the_file(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=4, size=(40, 40))
    result = bundle("run", "--config_file", f"['{TRAIN}','{EVALUATE}']", *SMALL, *folders(tmp_path))
    assert result.returncode != 0
    assert f"checkpoint not found: {tmp_path / 'models' / 'model.pt'}" in result.stdout + result.stderr


def test_inference_config_saves_masks_and_uncertainty_at_each_image_size(trained, tmp_path):
    tmp, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(tmp / "data" / "images" / "synthetic_0000.png", images / "a.png")
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(images / "b.jpg")
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": [5, 5, 40, 50], "b": [[1, 2, 30, 40], [10, 10, 60, 45]]}))
    ok(bundle("run", "--config_file", INFERENCE, "--encoder", "vit_tiny", "--image_size", "64", "--dataset_dir", str(images),
              "--boxes_file", str(tmp_path / "boxes.json"), "--ckpt_dir", str(tmp / "models"), "--output_dir", str(tmp_path / "out")))
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png")).shape == (64, 80)
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "b.png")).shape == (50, 70)
    assert np.load(tmp_path / "out" / "uncertainty" / "b.npy").shape == (2, 50, 70)
    assert (tmp_path / "out" / "overlays" / "a.png").is_file()


def test_verify_metadata_against_the_schema(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    assert "metadata is verified with no error" in ok(bundle("verify_metadata", "--meta_file", META, "--filepath", str(schema)))


def test_verify_net_in_out_with_a_box():
    log = ok(bundle("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", TRAIN, "--encoder", "vit_tiny",
                    "--image_size", "64", "--_meta_#network_data_format#inputs#image#spatial_shape", "[64,64]",
                    "--extra_forward_args", "{'prompts': [[[4.0, 6.0, 40.0, 50.0]]]}"))
    assert "data shape of network is verified with no error" in log


def test_ckpt_export_torchscript_matches_the_eager_model(trained, tmp_path):
    tmp, _ = trained
    ts = tmp_path / "model.ts"
    ok(bundle("ckpt_export", "export_network_def", "--filepath", str(ts), "--ckpt_file", str(tmp / "models" / "model.pt"),
              "--meta_file", META, "--config_file", TRAIN, "--encoder", "vit_tiny", "--image_size", "64", "--use_trace", "True", "--input_shape", "[1,4,64,64]",
              "--decoder_precision", "float32"))  # fmt: skip
    exported = torch.jit.load(str(ts))
    # a trace records the encoder and the prompt path in float32 (autocast is not recorded), whatever "auto"
    # means on this CPU: the eager models run them in float32 too
    precisions = dict(encoder_precision="float32", decoder_precision="float32")
    eager = build_imedsam("vit_tiny", image_size=64, **precisions, model_class=IMedSAMBoxMask).load_checkpoint(tmp / "models" / "model.pt").eval()
    # traced at batch 1 (the --input_shape), so it is called one image at a time
    x = torch.rand(2, 4, 64, 64)
    x[:, 3] = 0
    x[0, 3, 5:40, 10:50] = 1
    x[1, 3, 20:60, 2:30] = 1
    plain = build_imedsam("vit_tiny", image_size=64, **precisions).load_checkpoint(tmp / "models" / "model.pt").eval()
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(exported(x[i : i + 1]), eager(x[i : i + 1]), atol=1e-4, rtol=1e-4)
        # the box really comes from channel 3: the traced model follows a moved box
        expected = plain(x[1:, :3], torch.tensor([[[2.0, 20.0, 30.0, 60.0]]]))
        torch.testing.assert_close(exported(x[1:]), expected, atol=1e-4, rtol=1e-4)


def test_multi_gpu_config_trains_with_two_gloo_processes(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=8, size=(64, 64))
    runner = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle")
    log = ok(bundle("run", "--config_file", f"['{TRAIN}','{MULTI_GPU}']", *SMALL, "--label_size", "48", *folders(tmp_path), runner=runner))
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "val_mean_dice" in log
    # 5 training images over 2 processes of batch 2: each process runs ceil(3 / 2) = 2 iterations of its 3 samples
    assert "Epoch: 1/1, Iter: 2/2" in log


def test_bad_dataset_folders_are_clear_errors(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        polyp_datalist(str(tmp_path / "nowhere"))
    (tmp_path / "a" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="must contain images/ and masks/"):
        polyp_datalist(str(tmp_path / "a"))
    (tmp_path / "a" / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "images" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "masks" / "y.png")
    with pytest.raises(ValueError, match="no image/mask pairs .* none share a file name"):
        polyp_datalist(str(tmp_path / "a"), "all")
    write_synthetic_dataset(tmp_path / "b", count=5, size=(32, 32))
    (tmp_path / "b" / "images" / "synthetic_0001.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read image .*synthetic_0001.png"):
        polyp_datalist(str(tmp_path / "b"), "all")
    write_synthetic_dataset(tmp_path / "c", count=5, size=(32, 32))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "c" / "masks" / "synthetic_0002.png")
    with caplog.at_level(logging.WARNING):
        names = [item["name"] for item in polyp_datalist(str(tmp_path / "c"), "all")]
    assert "synthetic_0002" not in names and len(names) == 4
    assert "mask" in caplog.text and "is empty" in caplog.text
    (tmp_path / "split.json").write_text(json.dumps({"train": ["synthetic_0000.png", "missing.png"]}))
    with pytest.raises(ValueError, match="names 1 train images not paired"):
        polyp_datalist(str(tmp_path / "c"), "train", str(tmp_path / "split.json"))
    with pytest.raises(ValueError, match="has no 'test' list"):
        polyp_datalist(str(tmp_path / "c"), "test", str(tmp_path / "split.json"))


def test_bad_dataset_folder_through_the_cli_names_the_problem(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    result = bundle("run", "training", "--config_file", TRAIN, *SMALL, *folders(tmp_path))
    assert result.returncode != 0
    assert "must contain images/ and masks/" in result.stdout + result.stderr


def test_inference_config_serves_the_pretrained_lite_medsam_with_no_checkpoint(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    yy, xx = np.mgrid[:150, :220]
    disk = (yy - 70) ** 2 + (xx - 140) ** 2 <= 40**2
    picture = np.full((150, 220, 3), 45, np.uint8)
    picture[disk] = (215, 140, 135)
    Image.fromarray(picture).save(images / "disk.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"disk": [96, 26, 184, 114]}))
    ok(bundle("run", "--config_file", INFERENCE, "--load_pretrain", "False", "--dataset_dir", str(images),
              "--boxes_file", str(tmp_path / "boxes.json"), "--output_dir", str(tmp_path / "out")))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "disk.png")) > 0
    assert mask.shape == disk.shape
    assert 2 * (mask & disk).sum() / (mask.sum() + disk.sum()) > 0.9


def test_evaluate_the_sam_mask_decoder_ablation(tmp_path):
    write_synthetic_dataset(tmp_path / "data", count=5, size=(48, 48))
    torch.save(build_imedsam("vit_tiny", image_size=64, use_inr=False, freeze_sam=False).state_dict(), tmp_path / "no_inr.pt")
    log = ok(bundle("run", "--config_file", f"['{TRAIN}','{EVALUATE}']", *SMALL, "--use_inr", "False", "--label_size", "48",
                    "--ckpt_file", str(tmp_path / "no_inr.pt"), *folders(tmp_path)[:2], "--output_dir", str(tmp_path / "eval")))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["count"] == len(json.loads((tmp_path / "data" / "split.json").read_text())["test"])
    assert "evaluated" in log


def test_infer_with_the_sam_mask_decoder_ablation_saves_masks_and_no_uncertainty(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(images / "b.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"b": [[1, 2, 30, 40], [40, 10, 66, 45]]}))
    torch.save(build_imedsam("vit_tiny", image_size=64, use_inr=False, freeze_sam=False).state_dict(), tmp_path / "no_inr.pt")
    ok(bundle("run", "--config_file", INFERENCE, "--encoder", "vit_tiny", "--image_size", "64", "--use_inr", "False",
              "--dataset_dir", str(images), "--boxes_file", str(tmp_path / "boxes.json"),
              "--ckpt_file", str(tmp_path / "no_inr.pt"), "--output_dir", str(tmp_path / "out")))
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "b.png")).shape == (50, 70)
    assert not (tmp_path / "out" / "uncertainty").exists()
    # no uncertainty panel: the overlay is the image alone, with both boxes drawn in yellow
    picture = np.asarray(Image.open(tmp_path / "out" / "overlays" / "b.png"))
    assert picture.shape == (50, 70, 3)
    assert tuple(picture[2, 1]) == (255, 220, 0) and tuple(picture[10, 40]) == (255, 220, 0)


def test_evaluate_volume_scores_every_protocol_beside_the_lite_medsam_recipe(trained, tmp_path):
    import nibabel as nib

    tmp, _ = trained
    i, j, k = np.meshgrid(np.arange(48), np.arange(40), np.arange(6), indexing="ij")
    organ = ((i - 24) / 12) ** 2 + ((j - 20) / 9) ** 2 + ((k - 2.5) / 2.6) ** 2 <= 1
    nib.save(nib.Nifti1Image(np.where(organ, 60, -900).astype(np.int16), np.diag([0.8, 0.8, 2.0, 1])), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(organ.astype(np.uint8) * 3, np.diag([0.8, 0.8, 2.0, 1])), tmp_path / "ct_label.nii.gz")
    datalist = {"cases": [{"set": "phantoms", "case": "phantom", "modality": "ct", "image": "ct.nii.gz", "label": "ct_label.nii.gz",
                           "objects": {"organ": [3], "absent": [7]}}]}  # fmt: skip
    (tmp_path / "volumes.json").write_text(json.dumps(datalist))
    out = tmp_path / "eval"
    log = ok(bundle("run", "--config_file", f"['{TRAIN}','{INFERENCE_OVERLAY}','{EVALUATE_VOLUME}']", "--encoder", "vit_tiny",
                    "--image_size", "64", "--ckpt_dir", str(tmp / "models"), "--volume_datalist", str(tmp_path / "volumes.json"),
                    "--data_root", str(tmp_path), "--output_dir", str(out)))  # fmt: skip
    rows = (out / "volumes.csv").read_text().strip().splitlines()
    assert rows[0].startswith("set,case,object,protocol,method,dsc,nsd,gap_low,gap_high")
    assert len(rows) == 1 + 3 * 2  # one object (the absent one is left out), three protocols, two methods
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nsd_tolerance_mm"] == 2.0 and summary["objects"] == 1
    assert set(summary["means"]) == {f"{p}/{m}" for p in ("box3d", "slice_box", "every_slice") for m in ("imedsam", "lite_medsam")}
    # LiteMedSAM's pretrained weights find a bright ellipsoid in its tight boxes; the untrained vit_tiny need not
    assert summary["means"]["every_slice/lite_medsam"]["dsc"] > 0.8
    assert summary["by_set"]["phantoms"] == summary["means"]
    assert '"box3d/imedsam"' in log


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "dsb2018_nuclei_stardist")), reason="../shared/data is not beside the project")
def test_the_all_modality_overlay_trains_with_the_sampler_and_gives_the_modality_to_the_network(tmp_path):
    from monai.bundle import ConfigParser

    from imedsam.data import ModalityBalancedSampler

    overlay = os.path.join(CONFIGS, "train_modalities.yaml")
    parser = ConfigParser()
    parser.read_config([TRAIN, overlay])
    parser.update({"encoder": "vit_tiny", "image_size": 64, "modality_prompt": True, "modality_temperature": 0.5,
                   "exclude_modalities": ["ct", "mr", "endoscopy"]})  # fmt: skip
    sampler = parser.get_parsed_content("train#dataloader#sampler")
    assert isinstance(sampler, ModalityBalancedSampler) and sampler.temperature == 0.5 and sampler.num_samples == 120
    assert set(sampler.modalities) == {"microscopy"}
    assert parser.get_parsed_content("train#prepare_batch").extra_keys == {
        "boxes": "box", "modality": "modality", "points": "points", "point_labels": "point_labels"
    }  # fmt: skip
    # a two-step run on the microscopy items: the network sees their modality and learns its token
    log = ok(bundle("run", "training", "--config_file", f"['{TRAIN}','{overlay}']", *SMALL, "--label_size", "64",
                    "--modality_prompt", "true", "--exclude_modalities", "['ct','mr','endoscopy']", "--epoch_samples", "4",
                    "--val_samples", "2", "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")))  # fmt: skip
    assert "val_mean_dice" in log
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    counts = state["prompt_path.modality_prompt.trained_images"].tolist()
    assert counts[8] > 0 and sum(counts) == counts[8] + counts[11] == 4  # microscopy's row (and "any", by dropout)


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "brats2013_deepmedic_mr")), reason="../shared/data is not beside the project")
def test_the_volume_overlay_trains_the_adapters_on_slabs_of_patients_never_split_by_slice(tmp_path):
    from imedsam.data import slab_datalist

    train, test = slab_datalist("train", slab_depth=3), slab_datalist("test", slab_depth=3)
    assert {item["case"] for item in train}.isdisjoint({item["case"] for item in test})
    assert all(item["slab_depth"] == 3 for item in train) and len({item["name"] for item in train}) == len(train)
    overlay = os.path.join(CONFIGS, "train_volume.yaml")
    log = ok(bundle("run", "training", "--config_file", f"['{TRAIN}','{overlay}']", *SMALL, "--batch_size", "1",
                    "--label_size", "64", "--slab_depth", "3", "--epoch_samples", "2", "--val_samples", "1",
                    "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")))  # fmt: skip
    dice = float(log.split("val_mean_dice: ")[1].split()[0])
    assert 0.0 <= dice <= 1.0
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    ups = [key for key in state if key.startswith("image_encoder.volumetric_adapters.") and key.endswith("up.weight")]
    assert ups and all(torch.count_nonzero(state[key]) > 0 for key in ups)  # the zero start moved: the adapters trained
    model = build_imedsam("vit_tiny", image_size=64, freeze_sam=False, volumetric_adapter=True, slab_depth=3)
    assert set(state) == set(model.state_dict())
