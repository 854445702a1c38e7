"""scripts/prepare_polyp.py on generated copies of the published polyp layouts."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from imedsam.data import polyp_datalist
from imedsam.data.prepare_polyp import prepare_polyp_dataset, read_sequence_table, sequence_split

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(rng, size=(40, 52)):
    picture = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    top, left = rng.integers(2, size[0] // 2), rng.integers(2, size[1] // 2)
    mask[top : top + 10, left : left + 12] = 255
    return picture, mask


def write_kvasir_like(folder, count=6, seed=0):
    """images/*.jpg + masks/*.jpg, masks as 3-channel JPEGs (noisy around 0 and 255, as Kvasir-SEG's)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images")
    os.makedirs(folder / "masks")
    truth = {}
    for index in range(count):
        picture, mask = _pair(rng)
        stem = f"cju{index:04d}"
        Image.fromarray(picture).save(folder / "images" / f"{stem}.jpg", quality=90)
        Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(folder / "masks" / f"{stem}.jpg", quality=75)
        truth[stem] = mask > 127
    return truth


def write_cvc_like(folder, frames=range(1, 13)):
    """CVC-ClinicDB's official layout: TIF/Original/N.tif (RGB) + TIF/Ground Truth/N.tif (grey)."""
    rng = np.random.default_rng(1)
    os.makedirs(folder / "TIF" / "Original")
    os.makedirs(folder / "TIF" / "Ground Truth")
    pictures = {}
    for frame in frames:
        picture, mask = _pair(rng)
        Image.fromarray(picture).save(folder / "TIF" / "Original" / f"{frame}.tif")
        Image.fromarray(mask).save(folder / "TIF" / "Ground Truth" / f"{frame}.tif")
        pictures[str(frame)] = picture
    return pictures


def test_kvasir_layout_binarises_masks_keeps_pictures_and_splits(tmp_path):
    truth = write_kvasir_like(tmp_path / "src", count=10)
    record = prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"), seed=3)
    out = tmp_path / "out"
    assert record["pairs"] == 10 and record["counts"] == {"train": 6, "val": 2, "test": 2}
    for stem, expected in truth.items():
        assert (out / "images" / f"{stem}.jpg").read_bytes() == (tmp_path / "src" / "images" / f"{stem}.jpg").read_bytes()
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert set(np.unique(mask)) == {0, 255}
        # JPEG noise does not move the >127 boundary of a blocky mask by more than a few pixels
        assert ((mask > 0) != expected).sum() < 0.02 * expected.size
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(f"{s}.jpg" for s in truth)
    assert not os.path.exists(tmp_path / "out.partial")
    # the bundle's datalist reads the folder as it is
    assert [item["name"] for item in polyp_datalist(str(out), "test")] == [os.path.splitext(n)[0] for n in split["test"]]
    # the same seed gives the same split
    again = prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "again"), seed=3)
    assert json.loads((tmp_path / "again" / "split.json").read_text())["test"] == split["test"]
    assert again["counts"] == record["counts"]


def test_cvc_tif_layout_is_converted_losslessly_and_split_by_sequence(tmp_path):
    pictures = write_cvc_like(tmp_path / "cvc", frames=range(1, 13))
    table = tmp_path / "sequences.csv"
    table.write_text("first,last,sequence\n1,3,a\n4,6,b\n7,9,c\n10,10,d\n11,12,e\n")
    record = prepare_polyp_dataset(str(tmp_path / "cvc"), str(tmp_path / "out"), sequence_table=str(table), seed=0)
    assert record["images"].endswith(os.path.join("TIF", "Original"))
    for frame, picture in pictures.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / f"{frame}.png")), picture)
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    sequences = read_sequence_table(str(table))
    seen = {key: {sequences[os.path.splitext(name)[0]] for name in split[key]} for key in ("train", "val", "test")}
    assert all(seen.values())
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert sum(len(v) for v in seen.values()) == 5


def test_shipped_cvc_sequence_table_covers_612_frames_in_29_sequences():
    table = read_sequence_table(os.path.join(SCRIPTS, "data", "cvc_clinicdb_sequences.csv"))
    assert sorted(map(int, table)) == list(range(1, 613))
    assert len(set(table.values())) == 29
    assert table["25"] == table["1"] != table["26"] and table["612"] == "29" and table["205"] == "10"


def test_given_split_file_is_kept(tmp_path):
    write_kvasir_like(tmp_path / "src", count=6)
    given = {"train": ["cju0000.jpg", "cju0001.jpg", "cju0002.jpg"], "val": ["cju0003"], "test": ["cju0004.jpg", "cju0005.jpg"]}
    (tmp_path / "split.json").write_text(json.dumps(given))
    prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"), split_file=str(tmp_path / "split.json"))
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["val"] == ["cju0003.jpg"] and split["test"] == given["test"]
    (tmp_path / "bad.json").write_text(json.dumps({**given, "test": ["nope.jpg"]}))
    with pytest.raises(ValueError, match="does not have.*nope"):
        prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out2"), split_file=str(tmp_path / "bad.json"))


def test_swapped_folders_are_detected_and_can_be_swapped_back(tmp_path):
    write_cvc_like(tmp_path / "src", frames=range(1, 5))
    # the public copy: the grey masks sit in images/, the colour frames in masks/
    os.rename(tmp_path / "src" / "TIF" / "Original", tmp_path / "src" / "TIF" / "masks")
    os.rename(tmp_path / "src" / "TIF" / "Ground Truth", tmp_path / "src" / "TIF" / "images")
    with pytest.raises(ValueError, match="look swapped.*--swapped"):
        prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
    record = prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"), swapped=True)
    assert record["pairs"] == 4 and record["images"].endswith("masks")


def test_empty_mask_is_left_out_and_recorded(tmp_path):
    write_kvasir_like(tmp_path / "src", count=5)
    Image.fromarray(np.zeros((40, 52), np.uint8)).save(tmp_path / "src" / "masks" / "cju0002.jpg")
    record = prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"))
    assert record["left_out_empty_masks"] == ["cju0002"] and record["pairs"] == 4
    assert not os.path.exists(tmp_path / "out" / "images" / "cju0002.jpg")
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["left_out_empty_masks"] == ["cju0002"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda src: (src / "images" / "cju0001.jpg").write_bytes(b"not a jpeg"), r"could not read .*cju0001\.jpg"),
        (lambda src: os.remove(src / "masks" / "cju0003.jpg"), r"no partner.*cju0003"),
        (lambda src: Image.fromarray(np.zeros((30, 30), np.uint8)).save(src / "masks" / "cju0000.jpg"), r"is 52x40 but its mask .* is 30x30"),
        (lambda src: Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(src / "masks" / "cju0004.png"), r"two files named 'cju0004'"),
    ],
)
def test_bad_sources_name_the_problem_and_leave_no_output(tmp_path, damage, message):
    write_kvasir_like(tmp_path / "src", count=5)
    damage(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_colour_mask_and_missing_or_empty_folders(tmp_path):
    write_kvasir_like(tmp_path / "src", count=4)
    colour = np.zeros((40, 52, 3), np.uint8)
    colour[5:15, 5:15, 0] = 255
    Image.fromarray(colour).save(tmp_path / "src" / "masks" / "cju0001.jpg")
    with pytest.raises(ValueError, match="cju0001.jpg is a colour image"):
        prepare_polyp_dataset(str(tmp_path / "src"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_polyp_dataset(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    os.makedirs(tmp_path / "empty" / "images")
    os.makedirs(tmp_path / "empty" / "masks")
    with pytest.raises(ValueError, match="hold no images"):
        prepare_polyp_dataset(str(tmp_path / "empty"), str(tmp_path / "out"))
    os.makedirs(tmp_path / "unrelated" / "pictures")
    with pytest.raises(FileNotFoundError, match="holds no polyp dataset"):
        prepare_polyp_dataset(str(tmp_path / "unrelated"), str(tmp_path / "out"))


def test_sequence_split_needs_every_frame_and_three_sequences():
    with pytest.raises(ValueError, match="no sequence for 1 frames.*'9'"):
        sequence_split(["1", "2", "9"], {"1": "a", "2": "b"}, 0, (0.6, 0.2))
    with pytest.raises(ValueError, match="at least 3 sequences"):
        sequence_split(["1", "2"], {"1": "a", "2": "b"}, 0, (0.6, 0.2))


def test_script_reports_errors_with_exit_code_2(tmp_path, capsys):
    script = _load_script("prepare_polyp")
    write_kvasir_like(tmp_path / "src", count=4)
    assert script.main([str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 4
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "src"), str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "exists" in capsys.readouterr().err
