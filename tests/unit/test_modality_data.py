"""The all-modality 2D data (issue 31): modality names, the split file bundle/datalists/modalities.json, its
datalist, the item loader and the modality-balanced sampler. Tests that read ../shared/data skip without it."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam.data import (
    MODALITIES,
    ModalityBalancedSampler,
    default_modality_split_file,
    modality_datalist,
    modality_sample_weights,
    normalize_modality,
    read_modality_split,
)
from imedsam.transforms import LoadModalityItemd

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
needs_shared = pytest.mark.skipif(not (SHARED / "kvasir_sessile").is_dir(), reason="../shared/data is not beside the project")
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def split_table():
    return read_modality_split()


@pytest.fixture(scope="module")
def datalists():
    return {split: modality_datalist(split) for split in SPLITS}


# -- modality names -------------------------------------------------------------------------------------------


def test_modality_names():
    assert len(MODALITIES) == 11 and len(set(MODALITIES)) == 11
    for name in MODALITIES:
        assert normalize_modality(name) == name
        assert normalize_modality(f" {name.upper()} ") == name
    assert normalize_modality(None) is None and normalize_modality("") is None and normalize_modality("  ") is None


@pytest.mark.parametrize(
    "code, name",
    [("CT", "ct"), ("MR", "mr"), ("MRI", "mr"), ("PT", "pet"), ("PET", "pet"), ("US", "us"), ("CR", "xray"), ("DX", "xray"),
     ("RG", "xray"), ("XA", "xray"), ("MG", "mammography"), ("ES", "endoscopy"), ("OP", "fundus"), ("OPT", "oct"),
     ("SM", "microscopy"), ("GM", "microscopy"), ("mg", "mammography")],
)
def test_dicom_codes(code, name):
    assert normalize_modality(code) == name


@pytest.mark.parametrize("value", ["XC", "ultrasound scan", "SEG", 3, ["ct"]])
def test_unknown_modality_is_an_error_naming_it(value):
    with pytest.raises(ValueError, match="accepted: ct, mr, pet") as caught:
        normalize_modality(value)
    assert repr(value) in str(caught.value)


# -- the split file (no data read) ----------------------------------------------------------------------------


def test_split_file_missing_or_corrupt_names_it(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_modality_split(missing)
    corrupt = tmp_path / "bad.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_modality_split(corrupt)
    corrupt.write_text(json.dumps({"sets": {"a": {"modality": "XC", "kind": "picture", "split_by": "case", "splits": {}}}, "cases": []}))
    with pytest.raises(ValueError, match="bad.json.*set 'a'"):
        read_modality_split(corrupt)


def test_split_file_sets_and_rules(split_table):
    assert default_modality_split_file() == str(ROOT / "bundle" / "datalists" / "modalities.json")
    assert split_table["modalities"] == list(MODALITIES)
    sets = split_table["sets"]
    assert set(sets) == {"kvasir_sessile", "cvc_clinicdb_sample", "brats2013_deepmedic_mr", "totalseg_example_mr",
                         "totalseg_example_ct_dicom", "dsb2018_nuclei_stardist"}
    for name, spec in sets.items():
        assert spec["modality"] in MODALITIES
        assert isinstance(spec["split_rule"], str) and len(spec["split_rule"]) > 40, name
        assert all(spec["splits"][split] for split in SPLITS), f"{name} lacks a split"
    for case in split_table["cases"]:  # names only: nothing in the file holds pixel data
        assert not os.path.isabs(case["image"]) and not os.path.isabs(case["label"])


def test_split_file_has_nothing_in_two_splits(split_table):
    cases = split_table["cases"]
    for name, spec in split_table["sets"].items():
        splits = spec["splits"]
        if spec["split_by"] == "case":
            listed = [c["case"] for c in cases if c["set"] == name]
            seen = [case for split in SPLITS for case in splits[split]]
            assert len(seen) == len(set(seen)), f"{name}: a case is in two splits"
            assert set(seen) <= set(listed), f"{name}: a split names an unknown case"
        elif spec["split_by"] == "structure":
            assert sum(c["set"] == name for c in cases) == 1
            seen = [s for split in SPLITS for s in splits[split]]
            assert len(seen) == len(set(seen)) and set(seen) <= set(spec["objects"])
            values = [v for s in seen for v in spec["objects"][s]]
            assert len(values) == len(set(values)), f"{name}: a label value is in two structures"
            assert not set(seen) & set(spec.get("left_out", {}))
        else:
            boxes = [splits[split] for split in SPLITS]
            for i in range(3):
                for j in range(i + 1, 3):
                    (a0, a1, b0, b1), (c0, c1, d0, d1) = boxes[i], boxes[j]
                    assert min(a1, c1) <= max(a0, c0) or min(b1, d1) <= max(b0, d0), f"{name}: regions overlap"


def test_brats_split_by_patient_4_1_1(split_table):
    splits = split_table["sets"]["brats2013_deepmedic_mr"]["splits"]
    assert [len(splits[s]) for s in SPLITS] == [4, 1, 1]
    assert split_table["sets"]["brats2013_deepmedic_mr"]["objects"] == {"whole tumour": [1, 2, 3, 4]}


def test_cvc_val_comes_from_the_sample_split(split_table):
    with open(ROOT / "docs" / "results" / "cvc_sample_split.json") as handle:
        sample = json.load(handle)
    splits = split_table["sets"]["cvc_clinicdb_sample"]["splits"]
    assert len(splits["val"]) == 3 and set(splits["val"]) <= set(sample["train"])
    assert sorted(splits["train"] + splits["val"]) == sorted(sample["train"]) and splits["test"] == sample["test"]


@needs_shared
def test_kvasir_split_is_the_projects(split_table):
    with open(SHARED / "splits" / "kvasir_sessile_split.json") as handle:
        project = json.load(handle)
    splits = split_table["sets"]["kvasir_sessile"]["splits"]
    for split in SPLITS:
        assert splits[split] == [os.path.splitext(n)[0] for n in project[split]]


# -- the datalist ----------------------------------------------------------------------------------------------


@needs_shared
def test_datalist_items_and_no_leak(datalists, split_table):
    keys = {"image", "label", "modality", "set", "case", "name", "slice", "label_values", "instance", "crop"}
    names = [item["name"] for split in SPLITS for item in datalists[split]]
    assert len(names) == len(set(names))
    owner: dict = {}
    for split in SPLITS:
        items = datalists[split]
        assert {item["modality"] for item in items} == {"endoscopy", "mr", "ct", "microscopy"}
        for item in items:
            assert keys <= set(item) and os.path.isabs(item["image"]) and os.path.isfile(item["label"])
            rule = split_table["sets"][item["set"]]["split_by"]
            # the unit that must stay in one split: the case, the structure of the one case, the nucleus of the one image
            unit = {"case": item["case"], "structure": (item["case"], item["object"]), "region": (item["case"], item["instance"])}[rule]
            assert owner.setdefault((item["set"], unit), split) == split, f"{item['name']} in {split} and {owner[(item['set'], unit)]}"
            if rule == "case" and item["slice"] is not None:  # so no slice of one case is in two splits
                assert owner.setdefault((item["set"], item["case"], item["slice"]), split) == split
    # structures of one case: their label values never meet across splits
    for name in ("totalseg_example_mr", "totalseg_example_ct_dicom"):
        values = [{v for item in datalists[s] if item["set"] == name for v in item["label_values"]} for s in SPLITS]
        assert not (values[0] & values[1] or values[0] & values[2] or values[1] & values[2])


@needs_shared
def test_datalist_is_deterministic_and_filters(datalists):
    assert modality_datalist("val") == datalists["val"]
    ct = modality_datalist("val", modalities=["CT"])
    assert ct and {item["modality"] for item in ct} == {"ct"}
    rest = modality_datalist("val", exclude_modalities="endoscopy")
    assert len(rest) == sum(item["modality"] != "endoscopy" for item in datalists["val"])
    sparse = modality_datalist("val", slice_step=4, modalities=["mr"])
    assert 0 < len(sparse) < sum(item["modality"] == "mr" for item in datalists["val"])
    with pytest.raises(ValueError, match="split must be one of"):
        modality_datalist("validation")
    with pytest.raises(ValueError, match="slice_step"):
        modality_datalist("val", slice_step=0)


@needs_shared
def test_datalist_volume_slices_hold_min_pixels(datalists):
    volume_items = [item for item in datalists["train"] if item["slice"] is not None]
    by_case: dict = {}
    for item in volume_items:
        by_case.setdefault((item["label"], item["object"]), []).append(item["slice"])
    import nibabel

    label_path, object_name = next(iter(by_case))
    item = next(i for i in volume_items if i["label"] == label_path and i["object"] == object_name)
    label = np.isin(np.asarray(nibabel.load(label_path).dataobj), item["label_values"])
    counts = label.sum(axis=(0, 1))
    assert by_case[(label_path, object_name)] == [int(k) for k in np.flatnonzero(counts >= 50)][::2]


# -- the loader ------------------------------------------------------------------------------------------------


def _few_per_set(datalists):
    chosen = []
    for split in SPLITS:
        by_set: dict = {}
        for item in datalists[split]:
            by_set.setdefault(item["set"], []).append(item)
        for items in by_set.values():
            chosen += [items[0], items[-1]] if split == "train" else [items[len(items) // 2]]
    return chosen


@needs_shared
def test_every_item_kind_loads_with_foreground(datalists):
    load = LoadModalityItemd()
    for item in _few_per_set(datalists):
        out = load(item)
        image, label = out["image"], out["label"]
        assert image.dtype == torch.float32 and label.dtype == torch.float32
        assert image.shape[0] == 3 and label.shape[0] == 1 and image.shape[1:] == label.shape[1:], item["name"]
        assert 0 <= float(image.min()) and float(image.max()) <= 255 and float(image.max()) > 1
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
        assert float(label.sum()) >= (1 if item["slice"] is None else 50), f"{item['name']}: no foreground to box"
        assert {k: out[k] for k in item if k not in ("image", "label")} == {k: v for k, v in item.items() if k not in ("image", "label")}
        if item["crop"] is not None:
            y0, y1, x0, x1 = item["crop"]
            assert tuple(label.shape[1:]) == (y1 - y0, x1 - x0)


@needs_shared
def test_picture_matches_the_train_config_loading(datalists):
    from monai.transforms import Compose, LoadImaged

    from imedsam.transforms import BinarizeMaskd, EnsureRGBd

    item = next(i for i in datalists["test"] if i["set"] == "kvasir_sessile")
    reference = Compose([
        LoadImaged(keys=["image", "label"], reader="PILReader", reverse_indexing=False, ensure_channel_first=True, image_only=True),
        EnsureRGBd(keys="image"),
        BinarizeMaskd(keys="label", threshold=127),
    ])({"image": item["image"], "label": item["label"]})
    out = LoadModalityItemd()(item)
    for key in ("image", "label"):
        assert out[key].shape == reference[key].shape and out[key].dtype == reference[key].dtype
        assert torch.equal(torch.as_tensor(out[key]), torch.as_tensor(reference[key])), key
    # H rows x W columns of the picture
    from PIL import Image

    width, height = Image.open(item["image"]).size
    assert tuple(out["image"].shape) == (3, height, width)


@needs_shared
@pytest.mark.parametrize("set_name", ["brats2013_deepmedic_mr", "totalseg_example_ct_dicom"])
def test_volume_item_is_the_inference_plane(datalists, set_name):
    from imedsam.data.intensity import intensity_window
    from imedsam.inference.planes import image_plane, label_plane, load_image_array

    items = [i for i in datalists["val"] if i["set"] == set_name]
    item = items[len(items) // 2]
    out = LoadModalityItemd()(item)
    volume = np.asarray(load_image_array(item["image"]))
    labels = np.asarray(load_image_array(item["label"]))
    window = intensity_window(volume, modality=item["modality"])
    plane = image_plane(volume, False, item["slice"], window=window)
    mask = label_plane(np.isin(labels, item["label_values"]), False, item["slice"])
    np.testing.assert_allclose(out["image"].numpy(), plane.transpose(2, 0, 1) * 255, rtol=0, atol=1e-3)
    assert np.array_equal(out["label"].numpy()[0] > 0, mask)
    assert tuple(out["image"].shape[1:]) == (volume.shape[1], volume.shape[0])  # J rows x I columns


@needs_shared
def test_nucleus_item_is_one_instance_in_its_region(datalists):
    from PIL import Image

    item = next(i for i in datalists["val"] if i["set"] == "dsb2018_nuclei_stardist")
    y0, y1, x0, x1 = item["crop"]
    ids = np.asarray(Image.open(item["label"])).astype(np.int64)
    out = LoadModalityItemd()(item)
    assert np.array_equal(out["label"].numpy()[0] > 0, ids[y0:y1, x0:x1] == item["instance"])
    assert (ids == item["instance"]).sum() == (ids[y0:y1, x0:x1] == item["instance"]).sum()  # wholly inside
    grey = np.asarray(Image.open(item["image"]), dtype=np.float32)[y0:y1, x0:x1]
    assert np.array_equal(out["image"].numpy(), np.stack([grey] * 3))


def test_loader_error_names_the_file(tmp_path):
    item = {"image": str(tmp_path / "gone.png"), "label": str(tmp_path / "gone_mask.png"), "modality": "endoscopy",
            "slice": None, "crop": None, "instance": None}
    with pytest.raises(ValueError, match="gone.png"):
        LoadModalityItemd()(item)


# -- the sampler -----------------------------------------------------------------------------------------------


TOY = ["ct"] * 90 + ["mr"] * 9 + ["us"] * 1


@pytest.mark.parametrize("temperature, expected", [(1.0, (1 / 3, 1 / 3, 1 / 3)), (0.0, (0.90, 0.09, 0.01))])
def test_sampler_shares(temperature, expected):
    sampler = ModalityBalancedSampler([{"modality": m} for m in TOY], temperature=temperature, num_samples=20000, seed=0)
    draws = list(sampler)
    assert len(draws) == 20000
    counts = Counter(TOY[i] for i in draws)
    for name, share in zip(("ct", "mr", "us"), expected):
        assert abs(counts[name] / 20000 - share) < 0.02, (name, counts)
    assert sampler.probabilities == pytest.approx(dict(zip(("ct", "mr", "us"), expected)))
    # uniform within a modality: the 90 CT items share theirs about evenly
    ct = Counter(i for i in draws if TOY[i] == "ct")
    assert len(ct) == 90 and max(ct.values()) < 3 * min(ct.values())


def test_sampler_weights_and_determinism():
    weights = modality_sample_weights(TOY, 0.5)
    assert float(weights.sum()) == pytest.approx(1.0)
    share = {m: float(weights[[i for i, n in enumerate(TOY) if n == m]].sum()) for m in ("ct", "mr", "us")}
    total = 90**0.5 + 9**0.5 + 1
    assert share == pytest.approx({"ct": 90**0.5 / total, "mr": 3 / total, "us": 1 / total})
    assert list(ModalityBalancedSampler(TOY, 1.0, seed=3)) == list(ModalityBalancedSampler(TOY, 1.0, seed=3))
    assert len(ModalityBalancedSampler(TOY, 1.0)) == 100
    assert isinstance(ModalityBalancedSampler(TOY, 1.0), torch.utils.data.WeightedRandomSampler)


@pytest.mark.parametrize("temperature", [-0.1, 1.5, float("nan"), "hot", None])
def test_sampler_refuses_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ModalityBalancedSampler(TOY, temperature)
    with pytest.raises(ValueError, match="temperature"):
        modality_sample_weights(TOY, temperature)


def test_sampler_refuses_an_empty_list():
    with pytest.raises(ValueError, match="empty"):
        ModalityBalancedSampler([], 1.0)
    with pytest.raises(ValueError, match="empty"):
        modality_sample_weights([], 0.0)
