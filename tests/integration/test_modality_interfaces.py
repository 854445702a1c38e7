"""The image's modality (issue 31, MCP-MedSAM's modality prompt) through every interface: ``imedsam predict
--modality``, the Predictor and VolumePredictor, the bundle's inference.yaml, and the MONAI Label app's infer task
(request > the image's own code > ``--conf modality`` > none) and trainer (modality-balanced sampling)."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from conftest import import_app_module
from imedsam.cli import build_parser, main
from imedsam.data import ModalityBalancedSampler, synthetic_polyp, write_synthetic_dataset
from imedsam.data.intensity import CT_WINDOW
from imedsam.inference import Predictor, VolumePredictor, box3d_prompt
from imedsam.networks import build_imedsam

ROOT = Path(__file__).resolve().parents[2]
TRAIN, INFERENCE = str(ROOT / "bundle" / "configs" / "train.yaml"), str(ROOT / "bundle" / "configs" / "inference.yaml")
BOX = [10.0, 12.0, 50.0, 46.0]

pytest.importorskip("monailabel", reason="the MONAI Label app needs the 'label' extra: pip install -e '.[label]'")


@pytest.fixture(scope="module")
def modality_model():
    """A vit_tiny with a modality prompt whose gates are open (they start at zero), so that the modality changes
    the masks."""
    torch.manual_seed(0)
    model = build_imedsam("vit_tiny", image_size=64, modality_prompt=True)
    with torch.no_grad():
        model.prompt_path.token_gates.weight.uniform_(1.0, 2.0)
        model.prompt_path.modality_prompt.trained_images.fill_(1)  # as if every token had trained
        model.prompt_path.modality_prompt.tokens.weight.normal_(0.0, 3.0)
    return model.eval()


@pytest.fixture(scope="module")
def picture():
    image, _ = synthetic_polyp((56, 64), seed=3)
    return image


# -- the command line ------------------------------------------------------------------------------------------


def _predict_args(image, output, *extra):
    return ["predict", "--image", str(image), "--box", *map(str, BOX), "--output", str(output), "--encoder", "vit_tiny",
            "--image-size", "64", *extra]  # fmt: skip


@pytest.mark.parametrize("value, name", [("MR", "mr"), ("mri", "mr"), ("PT", "pet"), ("Endoscopy", "endoscopy"), ("", None)])
def test_cli_modality_takes_names_and_dicom_codes(value, name, tmp_path):
    args = build_parser().parse_args(_predict_args(tmp_path / "a.png", tmp_path / "m.png", "--modality", value))
    assert args.modality == name


def test_cli_refuses_an_unknown_modality_naming_the_accepted_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(_predict_args(tmp_path / "a.png", tmp_path / "m.png", "--modality", "bogus"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --modality: unknown modality 'bogus'" in err and "accepted: ct, mr, pet" in err and "PT->pet" in err


@pytest.fixture
def recorded(monkeypatch):
    """The modality of every ``Predictor.set_image`` call, and each ``VolumePredictor.set_volume``'s window."""
    calls = {"set_image": [], "windows": []}
    set_image, set_volume = Predictor.set_image, VolumePredictor.set_volume

    def record_image(self, image, modality=None):
        calls["set_image"].append(modality)
        return set_image(self, image, modality=modality)

    def record_volume(self, *args, **kwargs):
        set_volume(self, *args, **kwargs)
        calls["windows"].append((self.window, self.modality))

    monkeypatch.setattr(Predictor, "set_image", record_image)
    monkeypatch.setattr(VolumePredictor, "set_volume", record_volume)
    return calls


def test_cli_passes_a_pictures_modality_to_the_predictor(picture, tmp_path, recorded):
    Image.fromarray(picture).save(tmp_path / "a.png")
    assert main(_predict_args(tmp_path / "a.png", tmp_path / "m.png", "--modality", "ES", "--modality-prompt")) == 0
    assert recorded["set_image"] == ["endoscopy"] and (tmp_path / "m.png").is_file()


def test_cli_volume_modality_reaches_every_slice_and_picks_the_intensity_rule(tmp_path, recorded):
    volume = np.full((40, 32, 5), -1000, np.int16)  # air: guessed as CT without --modality
    volume[8:30, 6:26, 1:4] = np.random.default_rng(0).integers(0, 400, (22, 20, 3))
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    common = ["--image", str(tmp_path / "v.nii.gz"), "--box3d", "8", "6", "1", "30", "26", "4", "--encoder", "vit_tiny", "--image-size", "64",
              "--encoder-engine", "torch"]  # fmt: skip
    assert main(["predict", *common, "--output", str(tmp_path / "a.nii.gz")]) == 0
    assert recorded["windows"][-1] == (CT_WINDOW, None) and set(recorded["set_image"]) == {None}
    recorded["set_image"].clear()
    assert main(["predict", *common, "--output", str(tmp_path / "b.nii.gz"), "--modality", "MR"]) == 0
    window, modality = recorded["windows"][-1]
    assert modality == "mr" and window != CT_WINDOW  # the percentile rule, not the guessed CT window
    assert recorded["set_image"] and set(recorded["set_image"]) == {"mr"}


# -- the predictors --------------------------------------------------------------------------------------------


def test_predictor_modality_changes_a_modality_prompt_models_masks(modality_model, picture):
    predictor = Predictor(modality_model, encoder_engine="torch")
    probabilities = {}
    for modality in ("CT", "ct", "MR", None):
        predictor.set_image(picture, modality=modality)
        probabilities[modality] = predictor.predict(BOX).probability
    np.testing.assert_array_equal(probabilities["CT"], probabilities["ct"])
    assert np.abs(probabilities["ct"] - probabilities["MR"]).max() > 1e-3
    assert np.abs(probabilities["ct"] - probabilities[None]).max() > 1e-3


def test_volume_predictor_gives_the_modality_to_each_slice(modality_model):
    volume = np.zeros((40, 32, 5), np.float32)
    volume[8:30, 6:26, 1:4] = 1.0
    session = VolumePredictor(modality_model, encoder_engine="torch")
    results = {}
    for modality in ("CT", "MR"):
        session.set_volume(volume, window=(0.0, 1.0), modality=modality)  # one window: only the prompt differs
        results[modality] = session.predict([box3d_prompt([8, 6, 1, 30, 26, 4], volume.shape)]).probability
    assert session.modality == "mr"
    assert np.abs(results["CT"] - results["MR"]).max() > 1e-3
    with pytest.raises(ValueError, match="unknown modality 'bogus'"):
        session.set_volume(volume, modality="bogus")


# -- the bundle ------------------------------------------------------------------------------------------------


def _inference_parser(tmp_path, **overrides) -> ConfigParser:
    write_synthetic_dataset(tmp_path / "data", count=3, size=(48, 56))
    parser = ConfigParser()
    parser.read_config([TRAIN, INFERENCE])
    parser.update({"encoder": "vit_tiny", "image_size": 64, "load_pretrain": False, "dataset_dir": str(tmp_path / "data" / "images"),
                   "masks_dir": str(tmp_path / "data" / "masks"), "output_dir": str(tmp_path / "out"), **overrides})  # fmt: skip
    return parser


def test_bundle_inference_gives_the_modality_to_the_networks_prompts(tmp_path):
    parser = _inference_parser(tmp_path, modality="MR", modality_prompt=True)
    seen = []
    network = parser.get_parsed_content("network")
    network.register_forward_pre_hook(lambda module, args: seen.append(args[1].modalities()))
    parser.get_parsed_content("evaluator").run()
    assert seen == [("mr",)] * 3
    assert len(list((tmp_path / "out" / "masks").iterdir())) == 3


def test_bundle_inference_without_a_modality_keeps_the_boxes_only(tmp_path):
    parser = _inference_parser(tmp_path)
    assert parser.get_parsed_content("prepare_batch").extra_keys == {"boxes": "box"}
    assert all("modality" not in item for item in parser.get_parsed_content("dataset#data"))
    with pytest.raises(RuntimeError) as error:
        _inference_parser(tmp_path / "b", modality="bogus").get_parsed_content("prepare_batch")
    assert "unknown modality 'bogus'" in str(error.value.__cause__)  # the config parser wraps the error


# -- the MONAI Label app ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_modality():
    return import_app_module("lib.infers.modality")


def test_app_resolution_order_is_request_then_image_then_conf(app_modality):
    resolve = app_modality.resolve_modality
    assert resolve("MR", "CT", "us") == "mr"  # the request's field wins
    assert resolve(None, "CT", "us") == "ct"  # then the image's own code
    assert resolve("", None, "us") == "us"  # then --conf modality
    assert resolve(None, None, None) is None
    assert resolve(None, "", "us") == "us"  # an empty tag is no tag


def test_app_unknown_image_code_is_any_with_one_warning(app_modality, caplog):
    app_modality._warned.discard("OT")
    with caplog.at_level(logging.WARNING, logger=app_modality.__name__):
        assert app_modality.resolve_modality(None, "OT", "mr") is None  # the image says "other": not the conf's
        assert app_modality.resolve_modality(None, "OT", None) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'OT'" in warnings[0]


def test_app_bad_request_modality_is_a_400_naming_it(app_modality):
    with pytest.raises(app_modality.ModalityRequestError, match="modality: unknown modality 'bogus'; accepted: ct, mr") as error:
        app_modality.resolve_modality("bogus", "CT", "mr")
    assert error.value.status == 400
    with pytest.raises(app_modality.ModalityRequestError, match="must be a string"):
        app_modality.resolve_modality(3, None, None)


def _dicom_file(path: Path, modality: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Modality, dataset.is_little_endian, dataset.is_implicit_VR = modality, True, False
    dataset.save_as(str(path))


def test_app_image_code_from_its_info_or_a_dicom_series(app_modality, tmp_path):
    code = app_modality.image_modality_code
    assert code({"Modality": "MR"}) == "MR" and code({"modality": "us", "Modality": "CT"}) == "us"
    assert code({"Modality": "UNK"}) is None and code({}) is None and code(None) is None
    series = tmp_path / "series"
    series.mkdir()
    (series / "0_notes.txt").write_text("not DICOM")
    _dicom_file(series / "1.dcm", "PT")
    assert code({}, str(series)) == "PT" and code({"Modality": "CT"}, str(series)) == "CT"
    assert app_modality.dicom_series_modality(str(tmp_path / "missing")) is None
    data = app_modality.ResolveModalityd("mr")({"image_path": str(series), "image": str(series)})
    assert data[app_modality.MODALITY_KEY] == "pet"  # the series' tag beats the conf


def test_app_conf_keys(tmp_path):
    configs = import_app_module("lib.configs.imedsam")
    assert configs.conf_modality({"modality": "MR"}) == "mr" and configs.conf_modality({}) is None
    with pytest.raises(ValueError, match="--conf modality: unknown modality 'bogus'"):
        configs.conf_modality({"modality": "bogus"})
    assert configs.conf_modality_temperature({}) == 0.0 and configs.conf_modality_temperature({"modality_temperature": "0.5"}) == 0.5
    for bad in ("2", "-0.1", "nan", "warm"):
        with pytest.raises(ValueError, match="--conf modality_temperature must be a number from 0 to 1"):
            configs.conf_modality_temperature({"modality_temperature": bad})
    overrides = configs.network_overrides({"modality_prompt": "true"})
    assert overrides["modality_prompt"] is True and overrides["content_prompt"] is False
    with pytest.raises(ValueError, match="--conf content_prompt must be true or false"):
        configs.network_overrides({"content_prompt": "maybe"})


def test_app_infer_task_uses_the_resolved_modality(modality_model, picture, tmp_path, recorded):
    infers = import_app_module("lib.infers.imedsam")
    modality = import_app_module("lib.infers.modality")
    Image.fromarray(picture).save(tmp_path / "a.png")
    task = infers.IMedSAMInfer(modality_model, [], {"object": 1}, lambda: "test", dimension=2, encoder_engine="torch", modality="CT")
    request = {"image": str(tmp_path / "a.png"), "box": BOX, "device": "cpu"}
    answers = {}
    for name, extra in [("conf", {}), ("image", {modality.IMAGE_CODE_KEY: "PT"}), ("request", {modality.IMAGE_CODE_KEY: "PT", "modality": "MR"})]:
        _, result = task({**request, **extra})
        answers[name] = result["modality"]
    assert answers == {"conf": "ct", "image": "pet", "request": "mr"}
    assert recorded["set_image"] == ["ct", "pet", "mr"]
    with pytest.raises(modality.ModalityRequestError):
        task({**request, "modality": "bogus"})

    volume = np.zeros((40, 32, 5), np.float32)
    volume[8:30, 6:26, 1:4] = 1.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    task_3d = infers.IMedSAMInfer(modality_model, [], {"object": 1}, lambda: "test", dimension=3, encoder_engine="torch")
    _, result = task_3d({"image": str(tmp_path / "v.nii.gz"), "box3d": [8, 6, 1, 30, 26, 4], "device": "cpu", "modality": "US"})
    assert result["modality"] == "us" and recorded["windows"][-1][1] == "us"


class _Datastore:
    """What the trainer asks a datastore for its items' modalities."""

    def __init__(self, infos: dict[str, dict]) -> None:
        self.infos = infos

    def get_labeled_images(self):
        return list(self.infos)

    def get_image_info(self, image_id):
        return self.infos[image_id]


def test_trainer_draws_modality_balanced_when_the_labels_span_modalities(tmp_path):
    trainers = import_app_module("lib.trainers.imedsam")
    studies, masks = tmp_path / "studies", tmp_path / "masks"
    studies.mkdir(), masks.mkdir()
    infos = {}
    for i, code in enumerate(["CT", "CT", "MR", "MR", None, "OT"]):
        image, mask = synthetic_polyp((48, 56), seed=i)
        Image.fromarray(image).save(studies / f"img_{i}.png")
        Image.fromarray((mask > 0).astype(np.uint8)).save(masks / f"img_{i}.png")
        infos[f"img_{i}"] = {"path": str(studies / f"img_{i}.png"), **({"Modality": code} if code else {})}
    datalist = [{"image": str(studies / f"img_{i}.png"), "label": str(masks / f"img_{i}.png")} for i in range(6)]
    modalities = trainers.item_modalities(datalist, _Datastore(infos), None)
    assert modalities == ["ct", "ct", "mr", "mr", None, None]
    assert trainers.item_modalities(datalist, _Datastore(infos), "us")[4:] == ["us", None]  # the conf; "OT" stays none

    items = [{**item, "modality": m} for item, m in zip(datalist, modalities)]
    split = trainers.export_training_set(items, str(tmp_path / "data"), 0.2, 0)
    assert split["modalities"] == {f"img_{i}": m for i, m in enumerate(modalities)}
    assert json.loads((tmp_path / "data" / "split.json").read_text())["modalities"] == split["modalities"]

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"encoder": "vit_tiny", "image_size": 64, "label_size": 32, "dataset_dir": str(tmp_path / "data"),
                   "split_file": str(tmp_path / "data" / "split.json"), **trainers.sampler_overrides(split, 0.5, 0)})  # fmt: skip
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, ModalityBalancedSampler) and loader.sampler.temperature == 0.5
    expected = [split["modalities"][item["name"]] or "unknown" for item in loader.dataset.data]
    assert loader.sampler.modalities == expected and len(set(expected)) >= 2
    assert len(list(loader.sampler)) == len(split["train"])

    # one group (here: no modality at all) keeps the bundle's shuffling
    unknown = {**split, "modalities": dict.fromkeys(split["modalities"])}
    assert trainers.sampler_overrides(unknown, 1.0, 0) == {}
    assert trainers.sampler_overrides(split, 0.0, 0) == {}  # the data's own proportions: plain shuffling
    assert trainers.sampler_overrides({**split, "modalities": dict.fromkeys(split["modalities"], "ct")}, 1.0, 0) == {}


def _labelled_pictures(folder: Path, names: list[str]) -> list[dict]:
    """One synthetic picture and its 0/1 label per name (a file name, extension included), as the datastore holds them."""
    (folder / "studies").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    datalist = []
    for i, name in enumerate(names):
        image, mask = synthetic_polyp((48, 56), seed=i)
        Image.fromarray(image).save(folder / "studies" / name)
        Image.fromarray((mask > 0).astype(np.uint8)).save(folder / "labels" / f"{Path(name).stem}.png")
        datalist.append({"image": str(folder / "studies" / name), "label": str(folder / "labels" / f"{Path(name).stem}.png")})
    return datalist


def test_trainer_export_leaves_out_a_slice_with_a_nan_voxel_naming_it(tmp_path, caplog):
    trainers = import_app_module("lib.trainers.imedsam")
    volume = np.random.default_rng(0).normal(0, 100, (40, 32, 5)).astype(np.float32)
    label = np.zeros(volume.shape, np.uint8)
    label[10:30, 8:24, 1:4] = 1  # slices 1, 2 and 3 are labelled
    volume[12, 9, 2] = np.inf
    volume[30, 20, 4] = np.nan  # an unlabelled slice: never read
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "vol_label.nii.gz")
    items = [{"image": str(tmp_path / "vol.nii.gz"), "label": str(tmp_path / "vol_label.nii.gz"), "modality": "ct"}]
    with caplog.at_level(logging.WARNING):
        split = trainers.export_training_set(items, str(tmp_path / "data"), 0.5, 0)
    assert sorted(split["train"] + split["val"]) == ["vol_slice0001", "vol_slice0003"]
    assert f"skipping {tmp_path / 'vol.nii.gz'} slice 2: the volume has a NaN or infinite voxel at [12, 9, 2]" in caplog.text
    assert not (tmp_path / "data" / "images" / "vol_slice0002.png").exists()


def _trainer(trainers, tmp_path, modality_prompt: bool):
    network = {"encoder": "vit_tiny", "image_size": 64, "modality_prompt": modality_prompt, "content_prompt": False, "sam_checkpoint": None}
    return trainers.IMedSAMTrainer(str(ROOT / "bundle"), str(tmp_path / "model"), str(tmp_path / "model" / "imedsam.pt"), network, lambda: None)


def test_trainer_gives_a_modality_prompt_network_each_samples_modality(tmp_path):
    trainers = import_app_module("lib.trainers.imedsam")
    datalist = _labelled_pictures(tmp_path, [f"img_{i}.png" for i in range(6)])
    modalities = ["ct", "ct", "mr", None, None, "us"]
    run_dir = tmp_path / "model" / "imedsam" / "run"
    items = [{**item, "modality": m} for item, m in zip(datalist, modalities)]
    split = trainers.export_training_set(items, str(run_dir / "data"), 0.34, 0)
    assert split["val"] and any(split["modalities"][name] is None for name in split["train"])

    overrides = trainers.modality_prompt_overrides(split, {"modality_prompt": True}, TRAIN)
    assert overrides["train#prepare_batch#extra_keys#modality"] == "modality"
    assert overrides["train#dataset#data"] == "$@with_modality(@train_items_without_modality)"
    assert overrides["train_items_without_modality"].startswith("$imedsam.data.polyp_datalist(")  # the bundle's own
    assert trainers.with_modality([{"name": "a"}, {"name": "b"}, {"name": "c"}], {"a": "ct", "b": None}) == [
        {"name": "a", "modality": "ct"}, {"name": "b", "modality": "any"}, {"name": "c", "modality": "any"},
    ]  # fmt: skip

    trainer = _trainer(trainers, tmp_path, modality_prompt=True)
    settings = trainer.settings({"batch_size": 2, "train_label_size": 32, "train_query_size": 16, "label_size": 32})
    parser = trainer.bundle_workflow(settings, str(run_dir), split, None).parser
    for key, names in (("train#dataset#data", split["train"]), ("validate#dataset#data", split["val"])):
        data = parser.get_parsed_content(key)
        assert {item["name"]: item["modality"] for item in data} == {name: split["modalities"][name] or "any" for name in names}
    prepare_batch = parser.get_parsed_content("train#prepare_batch")
    assert prepare_batch.extra_keys == {"boxes": "box", "points": "points", "point_labels": "point_labels", "modality": "modality"}



def test_trainer_trains_a_modality_prompt_network_on_each_samples_modality(tmp_path, monkeypatch):
    """One real, short training run through the trainer (vit_tiny, one epoch, as tests/integration/test_label_app.py
    trains): every step and validation gives the network its images' modalities, "any" for an image of none."""
    trainers = import_app_module("lib.trainers.imedsam")
    from imedsam.networks import IMedSAM

    datalist = _labelled_pictures(tmp_path, [f"1.2.840.{i}.png" for i in range(4)])  # DICOM-UID-like names
    infos = {Path(item["image"]).name: {"path": item["image"], **({"Modality": c} if c else {})} for item, c in zip(datalist, ["CT", "MR", None, "CT"])}
    datastore = _Datastore(infos)
    datastore.datalist = lambda: datalist
    seen, forward = [], IMedSAM.forward

    def record(self, images, prompts=None, *args, **kwargs):
        seen.append(prompts.modalities())
        return forward(self, images, prompts, *args, **kwargs)

    monkeypatch.setattr(IMedSAM, "forward", record)
    trainer = _trainer(trainers, tmp_path, modality_prompt=True)
    stats = trainer({"max_epochs": 1, "batch_size": 2, "train_label_size": 32, "train_query_size": 16, "label_size": 32}, datastore)
    assert stats["train_samples"] + stats["val_samples"] == 4 and Path(trainer.publish_path).is_file()
    split = json.loads((tmp_path / "model" / "imedsam" / "train_01" / "data" / "split.json").read_text())
    expected = {name: m or "any" for name, m in split["modalities"].items()}
    assert {"any", "ct", "mr"} == set(expected.values())
    # the last forward is validation's, on the validation samples; training drew modality-balanced before it
    assert list(seen[-1]) == [expected[name.removesuffix(".png")] for name in split["val"]]
    assert len(seen) == 3 and {m for batch in seen for m in batch} == {"any", "ct", "mr"}
    assert any(k.startswith("prompt_path.modality_prompt") for k in torch.load(trainer.publish_path, map_location="cpu"))


def test_trainer_without_a_modality_prompt_keeps_the_bundles_items_and_boxes(tmp_path):
    trainers = import_app_module("lib.trainers.imedsam")
    items = [{**item, "modality": m} for item, m in zip(_labelled_pictures(tmp_path, ["a.png", "b.png", "c.png"]), ["ct", "mr", None])]
    run_dir = tmp_path / "model" / "imedsam" / "run"
    split = trainers.export_training_set(items, str(run_dir / "data"), 0.34, 0)
    assert trainers.modality_prompt_overrides(split, {"modality_prompt": False}, TRAIN) == {}
    trainer = _trainer(trainers, tmp_path, modality_prompt=False)
    parser = trainer.bundle_workflow(trainer.settings({}), str(run_dir), split, None).parser
    assert parser.get_parsed_content("train#prepare_batch").extra_keys == {"boxes": "box", "points": "points", "point_labels": "point_labels"}
    assert all("modality" not in item for item in parser.get_parsed_content("train#dataset#data"))


def test_training_export_names_samples_by_the_whole_file_name(tmp_path):
    trainers = import_app_module("lib.trainers.imedsam")
    assert trainers.sample_id("/s/vol.nii.gz") == "vol" and trainers.sample_id("/s/x.JPG") == "x"
    assert trainers.sample_id("/s/1.2.840.113619.2.55.3/") == "1.2.840.113619.2.55.3"  # a DICOM series folder
    # two images whose names share their first dot-separated part: both kept (they were both "1", overwritten)
    datalist = _labelled_pictures(tmp_path / "uids", ["1.2.840.113619.1.png", "1.2.840.113619.2.png", "1.3.png"])
    split = trainers.export_training_set(datalist, str(tmp_path / "data"), 0.34, 0)
    names = ["1.2.840.113619.1", "1.2.840.113619.2", "1.3"]
    assert sorted(split["train"] + split["val"]) == names and sorted(split["modalities"]) == names
    assert sorted(p.name for p in (tmp_path / "data" / "images").iterdir()) == [f"{n}.png" for n in names]
    for n, item in zip(names, datalist):  # each pair is its own image's
        exported = np.asarray(Image.open(tmp_path / "data" / "masks" / f"{n}.png")) > 127
        np.testing.assert_array_equal(exported, np.asarray(Image.open(item["label"])) > 0)
    # the bundle reads the exported split back, dots and all
    from imedsam.data import polyp_datalist

    read = {s: [item["name"] for item in polyp_datalist(str(tmp_path / "data"), s)] for s in ("train", "val")}
    assert read == {"train": split["train"], "val": split["val"]}

    # two images that would still give one name are refused, naming both, before anything is written
    clash = _labelled_pictures(tmp_path / "one", ["scan.png"]) + _labelled_pictures(tmp_path / "two", ["scan.jpg", "other.png"])
    with pytest.raises(trainers.TrainingDataError, match=r"one/studies/scan.png and .*two/studies/scan.jpg would both be exported as 'scan'"):
        trainers.export_training_set(clash, str(tmp_path / "clash"), 0.34, 0)
    assert not list((tmp_path / "clash" / "images").iterdir())


def test_the_apps_training_keeps_training_clicks_for_a_click_model(tmp_path):
    trainers = import_app_module("lib.trainers.imedsam")
    assert _trainer(trainers, tmp_path, modality_prompt=False).settings({})["click_prob"] == 0.0
    network = {"encoder": "vit_tiny", "image_size": 64, "modality_prompt": False, "content_prompt": False,
               "sam_checkpoint": None, "decoder_lora_rank": 2}  # fmt: skip
    trainer = trainers.IMedSAMTrainer(str(ROOT / "bundle"), str(tmp_path / "model"), str(tmp_path / "model" / "imedsam.pt"), network, lambda: None)
    settings = trainer.settings({})
    assert settings["click_prob"] == 0.75 and trainer.settings({"click_prob": 0})["click_prob"] == 0.0
    items = _labelled_pictures(tmp_path, ["a.png", "b.png", "c.png"])
    run_dir = tmp_path / "model" / "imedsam" / "run"
    split = trainers.export_training_set(items, str(run_dir / "data"), 0.34, 0)
    parser = trainer.bundle_workflow(settings, str(run_dir), split, None).parser
    assert parser.get_parsed_content("train#inferer").click_prob == 0.75
    assert parser.get_parsed_content("network_def").prompt_path.decoder_lora is not None
