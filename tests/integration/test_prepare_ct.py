"""scripts/prepare_ct_slices.py on generated CT volumes, and the multi-organ datalist through the bundle."""

import csv
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from imedsam.data import polyp_datalist
from imedsam.data.prepare_ct import find_volume_pairs, prepare_ct_slices, read_label_map, window_hu
from imedsam.transforms import BinarizeMaskd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = (48, 40, 6)  # x, y, z in RAS+
LIVER, SPLEEN, AORTA = 6, 1, 8


def ct_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU volume and label volume: liver on slices 1-4, spleen on 2-3, a 3-voxel aorta speck on 5."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-50, 30, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    x, y = 4 + seed % 5, 6 + seed % 3
    label[x : x + 12, y : y + 10, 1:5] = LIVER
    label[30:39, 20:28, 2:4] = SPLEEN
    label[40, 30:33, 5] = AORTA
    hu[label == LIVER] = 60
    hu[label == SPLEEN] = 45
    return hu, label


def write_cases(folder, count=5, naming="bcv", affine=None):
    affine = np.diag([1.0, 1.0, 2.5, 1.0]) if affine is None else affine
    image_dir, label_dir = folder / "img", folder / "label"
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for case in range(1, count + 1):
        hu, label = ct_case(case)
        image_name, label_name = (f"img{case:04d}.nii.gz", f"label{case:04d}.nii.gz") if naming == "bcv" else (f"amos_{case:04d}.nii.gz",) * 2
        nib.save(nib.Nifti1Image(hu, affine), image_dir / image_name)
        nib.save(nib.Nifti1Image(label, affine), label_dir / label_name)
    return image_dir, label_dir


def test_slices_masks_labels_and_split_by_case(tmp_path):
    image_dir, label_dir = write_cases(tmp_path / "bcv", count=5)
    record = prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "out"), label_map="bcv", seed=1)
    out = tmp_path / "out"
    # slice 0 has no organ and slice 5 only a speck below min_pixels: 4 slices a case
    assert record["cases"] == 5 and record["slices"] == 20
    assert record["boxes_per_organ"]["liver"] == 20 and record["boxes_per_organ"]["spleen"] == 10
    assert record["boxes_per_organ"]["aorta"] == 0
    assert sorted(os.listdir(out / "images")) == sorted(os.listdir(out / "masks"))
    assert json.loads((out / "labels.json").read_text())["6"] == "liver"
    hu, label = ct_case(3)
    picture = np.asarray(Image.open(out / "images" / "img0003_z002.png"))
    mask = np.asarray(Image.open(out / "masks" / "img0003_z002.png"))
    assert picture.shape == (SHAPE[1], SHAPE[0]) and picture.dtype == np.uint8
    # radiological view of a RAS+ plane: the patient's right (high x) on the picture's left, anterior (high y) at
    # the top, so voxel (x, y) is pixel (row 39 - y, column 47 - x); case 3's liver is x 7..18, y 6..15
    expected = np.zeros((SHAPE[1], SHAPE[0]), np.uint8)
    expected[24:34, 29:41] = LIVER
    expected[12:20, 9:18] = SPLEEN
    assert np.array_equal(mask, expected)
    assert np.array_equal(picture, window_hu(hu[:, :, 2], 40, 400).T[::-1, ::-1])
    assert set(np.unique(mask)) == {0, SPLEEN, LIVER}
    split = json.loads((out / "split.json").read_text())
    assert sorted(len(cases) for cases in split["cases"].values()) == [1, 1, 3]
    for key, cases in split["cases"].items():
        assert sorted(split[key]) == sorted(n for n in os.listdir(out / "images") if n.split("_z")[0] in cases)


def test_multi_organ_datalist_gives_one_item_and_mask_per_organ(tmp_path):
    image_dir, label_dir = write_cases(tmp_path / "bcv", count=3)
    prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "out"), fractions=(0.34, 0.33))
    items = polyp_datalist(str(tmp_path / "out"), "all")
    # per case: liver on 4 slices, spleen on 2
    assert len(items) == 3 * 6
    spleen = [item for item in items if item["class"] == "spleen"]
    assert len(spleen) == 6 and all(item["label_value"] == SPLEEN and item["name"].endswith("_spleen") for item in spleen)
    import torch

    label_map = torch.as_tensor(np.asarray(Image.open(spleen[0]["label"]))[None].astype(np.float32))
    binary = BinarizeMaskd("label")({"label": label_map, "label_value": SPLEEN})["label"]
    assert torch.equal(binary, (label_map == SPLEEN).float())
    assert torch.equal(BinarizeMaskd("label")({"label": label_map})["label"], torch.zeros_like(label_map))


def test_reoriented_volume_gives_the_same_slices(tmp_path):
    ras = write_cases(tmp_path / "ras", count=3)
    prepare_ct_slices(*map(str, ras), str(tmp_path / "out_ras"))
    # the same anatomy stored LPS: x and y reversed, with an affine that says so
    lps_affine = np.diag([-1.0, -1.0, 2.5, 1.0])
    lps_affine[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    os.makedirs(tmp_path / "lps" / "img")
    os.makedirs(tmp_path / "lps" / "label")
    for case in range(1, 4):
        hu, label = ct_case(case)
        nib.save(nib.Nifti1Image(hu[::-1, ::-1].copy(), lps_affine), tmp_path / "lps" / "img" / f"img{case:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label[::-1, ::-1].copy(), lps_affine), tmp_path / "lps" / "label" / f"label{case:04d}.nii.gz")
    prepare_ct_slices(str(tmp_path / "lps" / "img"), str(tmp_path / "lps" / "label"), str(tmp_path / "out_lps"))
    for folder in ("images", "masks"):
        for name in os.listdir(tmp_path / "out_ras" / folder):
            a = np.asarray(Image.open(tmp_path / "out_ras" / folder / name))
            b = np.asarray(Image.open(tmp_path / "out_lps" / folder / name))
            assert np.array_equal(a, b), name


def test_label_maps_windows_and_pairing(tmp_path):
    assert len(read_label_map("bcv")) == 13 and len(read_label_map("amos")) == 15
    assert read_label_map("amos")[15] == "prostate/uterus" and read_label_map("bcv")[11] == "pancreas"
    assert window_hu(np.array([-1000, -160, 40, 240, 3000]), 40, 400).tolist() == [0, 0, 128, 255, 255]
    image_dir, label_dir = write_cases(tmp_path / "amos", count=3, naming="amos")
    assert list(find_volume_pairs(str(image_dir), str(label_dir))) == ["amos_0001", "amos_0002", "amos_0003"]
    (tmp_path / "liver.json").write_text('{"6": "liver"}')
    record = prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "liver"), label_map=str(tmp_path / "liver.json"))
    assert record["boxes_per_organ"] == {"liver": 12}
    masks = [np.asarray(Image.open(tmp_path / "liver" / "masks" / n)) for n in os.listdir(tmp_path / "liver" / "masks")]
    assert set(np.unique(np.stack(masks))) == {0, LIVER}
    # values that share a name are one object: liver and spleen merged, written as the smaller value
    (tmp_path / "merged.json").write_text(f'{{"{LIVER}": "abdomen", "{SPLEEN}": "abdomen"}}')
    merged = prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "merged"), label_map=str(tmp_path / "merged.json"))
    assert merged["boxes_per_organ"] == {"abdomen": 12}
    assert json.loads((tmp_path / "merged" / "labels.json").read_text()) == {str(SPLEEN): "abdomen"}
    stacked = np.stack([np.asarray(Image.open(tmp_path / "merged" / "masks" / n)) for n in os.listdir(tmp_path / "merged" / "masks")])
    assert set(np.unique(stacked)) == {0, SPLEEN} and (stacked > 0).sum() == sum((m > 0).sum() for m in masks) + 3 * 2 * 9 * 8  # three cases, spleen on 2 slices
    for bad in ('{"0": "background"}', '["liver"]', '{"six": "liver"}', "not json"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match="label"):
            read_label_map(str(tmp_path / "bad.json"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: nib.save(nib.Nifti1Image(np.zeros((48, 40, 5), np.uint8), np.diag([1.0, 1.0, 2.5, 1.0])), d / "label" / "label0002.nii.gz"),
         r"img0002.nii.gz has shape \(48, 40, 6\) but its label .*label0002.nii.gz has \(48, 40, 5\)"),
        (lambda d: _truncate(d / "img" / "img0001.nii.gz"), r"could not read NIfTI volume .*img0001.nii.gz"),
        (lambda d: (d / "img" / "img0003.nii.gz").write_bytes(gzip.compress(b"garbage")), r"could not read NIfTI volume .*img0003"),
        (lambda d: os.remove(d / "label" / "label0003.nii.gz"), r"image or a label volume but not both, e.g. \['3'\]"),
        (lambda d: nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), np.diag([1.0, 1.0, 2.5, 1.0])), d / "label" / "label0001.nii.gz"),
         r"label0001.nii.gz is not a label volume"),
        (lambda d: nib.save(nib.Nifti1Image(ct_case(2)[1], np.diag([2.0, 1.0, 2.5, 1.0])), d / "label" / "label0002.nii.gz"),
         r"different affines"),
    ],
)
def test_bad_volumes_name_the_problem_and_leave_no_output(tmp_path, damage, message):
    write_cases(tmp_path / "bcv", count=4)
    damage(tmp_path / "bcv")
    with pytest.raises(ValueError, match=message):
        prepare_ct_slices(str(tmp_path / "bcv" / "img"), str(tmp_path / "bcv" / "label"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_empty_or_missing_folders_and_too_few_cases(tmp_path):
    os.makedirs(tmp_path / "empty" / "img")
    os.makedirs(tmp_path / "empty" / "label")
    with pytest.raises(ValueError, match="no NIfTI volumes"):
        prepare_ct_slices(str(tmp_path / "empty" / "img"), str(tmp_path / "empty" / "label"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_ct_slices(str(tmp_path / "nowhere"), str(tmp_path / "empty" / "label"), str(tmp_path / "out"))
    image_dir, label_dir = write_cases(tmp_path / "two", count=2)
    with pytest.raises(ValueError, match="at least 3 cases"):
        prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "out"))


def test_script_and_bundle_train_and_evaluate_per_organ(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_ct_slices", os.path.join(ROOT, "scripts", "prepare_ct_slices.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    image_dir, label_dir = write_cases(tmp_path / "bcv", count=3)
    assert script.main([str(image_dir), str(label_dir), str(tmp_path / "data"), "--fractions", "0.34", "0.33"]) == 0
    with pytest.raises(SystemExit) as stop:
        script.main([str(image_dir), str(label_dir), str(tmp_path / "data")])
    assert stop.value.code == 2

    configs = os.path.join(ROOT, "bundle", "configs")
    common = ["--dataset_dir", str(tmp_path / "data"), "--ckpt_dir", str(tmp_path / "models"), "--encoder", "vit_tiny",
              "--image_size", "64", "--label_size", "64"]
    for args in (
        ["run", "training", "--config_file", os.path.join(configs, "train.yaml"), "--max_epochs", "1", "--batch_size", "2"],
        ["run", "--config_file", f"['{configs}/train.yaml','{configs}/evaluate.yaml']", "--output_dir", str(tmp_path / "eval"), "--eval_split", "all"],
    ):
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *args, *common], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["count"] == 18
    assert {name: entry["count"] for name, entry in summary["per_class"].items()} == {"liver": 12, "spleen": 6}
    with open(tmp_path / "eval" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({row["class"] for row in rows}) == ["liver", "spleen"]
    liver = [float(row["dice"]) for row in rows if row["class"] == "liver"]
    assert summary["per_class"]["liver"]["dice"]["mean"] == pytest.approx(np.mean(liver))


def test_mr_volumes_use_their_non_zero_percentiles(tmp_path):
    image_dir, label_dir = tmp_path / "img", tmp_path / "label"
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for case in range(1, 4):
        _, label = ct_case(case)
        mr = np.zeros(SHAPE, np.float32)  # background 0, as MR volumes are
        mr[2:46, 2:38] = 100.0  # body
        mr[label == LIVER] = 300.0
        mr[10, 10, :] = 5000.0  # a few hot voxels, clipped away by the 99.5th percentile
        nib.save(nib.Nifti1Image(mr, np.eye(4)), image_dir / f"img{case:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), label_dir / f"label{case:04d}.nii.gz")
    record = prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "out"), label_map="bcv", modality="mr")
    assert record["modality"] == "mr"
    name = sorted(os.listdir(tmp_path / "out" / "images"))[0]
    image = np.asarray(Image.open(tmp_path / "out" / "images" / name))
    # 0.5-99.5 percentiles of the non-zero voxels are 100 (body) and 300 (liver): body 0, liver 255, air 0
    assert set(np.unique(image)) == {0, 255}
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / name))
    assert (image[mask == LIVER] == 255).all()
    with pytest.raises(ValueError, match="modality"):
        prepare_ct_slices(str(image_dir), str(label_dir), str(tmp_path / "x"), modality="pet")


def test_a_hand_built_volume_gives_the_written_out_radiological_slice(tmp_path):
    # 3 x 2 x 1 voxels with an identity affine, RAS+: x grows towards the patient's right, y towards anterior
    hu = np.array([[[-1000.0], [240.0]], [[-160.0], [1000.0]], [[240.0], [-160.0]]], np.float32)
    label = np.zeros((3, 2, 1), np.uint8)
    label[0, :, 0] = LIVER  # x = 0: the patient's leftmost column
    label[2, 1, 0] = SPLEEN  # right and anterior
    for folder, volume in (("img", hu), ("label", label)):
        os.makedirs(tmp_path / folder)
        for case in (1, 2, 3):  # a split by case needs three
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / folder / f"{folder}000{case}.nii.gz")
    prepare_ct_slices(str(tmp_path / "img"), str(tmp_path / "label"), str(tmp_path / "out"), min_pixels=1)
    picture = np.asarray(Image.open(tmp_path / "out" / "images" / "img0001_z000.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "img0001_z000.png"))
    # radiological view: anterior (y = 1) at the top, the patient's right (x = 2) on the left;
    # window 40/400 maps -160 HU and below to 0, 240 HU and above to 255
    np.testing.assert_array_equal(picture, [[0, 255, 255], [255, 0, 0]])
    np.testing.assert_array_equal(mask, [[SPLEEN, 0, LIVER], [0, 0, LIVER]])
