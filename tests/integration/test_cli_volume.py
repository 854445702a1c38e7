"""``imedsam predict`` on volumes: NIfTI, NRRD and a DICOM series in, a NIfTI label on the input's grid out."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import tiny_model
from imedsam.cli import main
from imedsam.inference import load_image_array

DICOM_CT = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg_example_ct_dicom" / "dicom"
AFFINE = np.array([[0.8, 0, 0, -20], [0, 0.8, 0, 10], [0, 0, 2.5, 5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(tiny_model().state_dict(), path)
    return str(path)


@pytest.fixture
def volume_file(tmp_path):
    rng = np.random.default_rng(0)
    volume = (rng.random((40, 36, 8)) * 300 - 100).astype(np.int16)
    volume[10:30, 8:28, 2:7] += 400
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    return path


def _base(checkpoint, image, output):
    return ["predict", "--encoder", "vit_tiny", "--image-size", "64", "--checkpoint", checkpoint, "--image", str(image),
            "--output", str(output)]  # fmt: skip


def test_box3d_objects_give_labels_and_uncertainty_on_the_input_grid(checkpoint, volume_file, tmp_path):
    output, uncertainty = tmp_path / "out" / "mask.nii.gz", tmp_path / "unc.nii.gz"
    args = _base(checkpoint, volume_file, output) + ["--box3d", "10", "8", "2", "30", "28", "7", "--box3d", "2", "2", "0", "12", "12", "3",
                                                       "--uncertainty", str(uncertainty), "--modality", "ct"]  # fmt: skip
    assert main(args) == 0
    labels = nib.load(output)
    np.testing.assert_allclose(labels.affine, AFFINE)
    assert labels.shape == (40, 36, 8) and labels.get_data_dtype() == np.uint8
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) <= {0, 1, 2}
    assert not values[:, :, 7].any()  # outside both boxes' z-ranges nothing is decoded
    unc = nib.load(uncertainty)
    assert unc.shape == (40, 36, 8) and np.asarray(unc.dataobj).max() > 0


def test_box_on_a_slice_and_nrrd_input(checkpoint, tmp_path):
    import nrrd

    volume = np.zeros((32, 30, 6), np.float32)
    volume[8:24, 6:22, 1:5] = 1.0
    nrrd.write(str(tmp_path / "mr.nrrd"), volume, {"space directions": np.diag([1.5, 1.5, 3.0]), "space": "left-posterior-superior", "space origin": np.zeros(3)})
    output = tmp_path / "mask.nii"
    args = _base(checkpoint, tmp_path / "mr.nrrd", output) + ["--box", "8", "6", "24", "22", "--slice", "2", "--window", "0", "1"]
    assert main(args) == 0
    written = nib.load(output)
    loaded = load_image_array(str(tmp_path / "mr.nrrd"))
    assert written.shape == (32, 30, 6)
    np.testing.assert_allclose(written.affine, np.asarray(loaded.affine), atol=1e-6)


@pytest.mark.skipif(not DICOM_CT.is_dir(), reason="../shared/data/totalseg_example_ct_dicom is not beside the project")
def test_dicom_series_folder(checkpoint, tmp_path):
    output = tmp_path / "mask.nii.gz"
    assert main(_base(checkpoint, DICOM_CT, output) + ["--box3d", "200", "200", "8", "300", "300", "11"]) == 0
    written = nib.load(output)
    assert written.shape == (512, 512, 20)
    np.testing.assert_allclose(written.affine, np.asarray(load_image_array(str(DICOM_CT)).affine), atol=1e-4)
    assert not np.asarray(written.dataobj)[:, :, :8].any()


@pytest.mark.parametrize(
    "prompt, message",
    [
        (["--box3d", "10", "8", "2", "50", "28", "7"], "outside the volume"),
        (["--box3d", "10", "8", "5", "30", "28", "5"], "whole slices"),
        (["--box", "10", "8", "30", "28"], "needs --slice"),
        (["--box", "10", "8", "30", "28", "--slice", "8"], "slice 8 is outside"),
        (["--box3d", "10", "8", "2", "30", "28", "7", "--slice", "3"], "--slice goes with --box"),
        (["--click", "20", "18"], "a click on a volume is I J K"),
        (["--click", "20", "18", "9"], "outside the volume"),
        (["--click", "20", "18", "4", "--slice", "4"], "its slice the third value"),
    ],
)
def test_bad_prompts_exit_2_and_write_nothing(checkpoint, volume_file, tmp_path, caplog, prompt, message):
    output = tmp_path / "mask.nii.gz"
    assert main(_base(checkpoint, volume_file, output) + prompt) == 2
    assert message in caplog.text and not output.exists()


def test_one_click_prompts_the_object_in_3d(checkpoint, volume_file, tmp_path, caplog):
    output = tmp_path / "mask.nii.gz"
    args = _base(checkpoint, volume_file, output) + ["--click", "20", "18", "4", "--background-click", "2", "2", "4"]
    assert main(args) == 0
    assert nib.load(output).shape == (40, 36, 8)
    if not np.asarray(nib.load(output).dataobj).any():  # an untrained model: told why, not left to guess
        assert "does not answer clicks" in caplog.text


def test_bad_volumes_exit_2_and_write_nothing(checkpoint, tmp_path, caplog):
    output = tmp_path / "mask.nii.gz"
    box = ["--box3d", "0", "0", "0", "4", "4", "2"]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    assert main(_base(checkpoint, tmp_path / "4d.nii.gz", output) + box) == 2
    assert "4D volume" in caplog.text
    nan = np.ones((16, 16, 4), np.float32)
    nan[5, 6, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    assert main(_base(checkpoint, tmp_path / "nan.nii.gz", output) + ["--box3d", "0", "0", "0", "16", "16", "4", "--window", "0", "2"]) == 2
    assert "NaN or infinite voxel at [5, 6, 1]" in caplog.text
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume")
    assert main(_base(checkpoint, tmp_path / "junk.nii.gz", output) + box) == 2
    assert "could not read image" in caplog.text
    (tmp_path / "series").mkdir()
    assert main(_base(checkpoint, tmp_path / "series", output) + box) == 2
    assert "empty folder" in caplog.text
    (tmp_path / "series" / "a.dcm").write_bytes(b"not dicom")
    assert main(_base(checkpoint, tmp_path / "series", output) + box) == 2
    assert "could not read image" in caplog.text
    assert main(_base(checkpoint, tmp_path / "nan.nii.gz", tmp_path / "mask.png") + box) == 2
    assert "must end in .nii.gz or .nii" in caplog.text
    assert not output.exists() and not list(tmp_path.glob(".imedsam-*"))


def test_a_volumetric_adapter_checkpoint_encodes_slabs_and_must_be_named(volume_file, tmp_path, caplog):
    from imedsam.networks import build_imedsam

    torch.manual_seed(0)
    model = build_imedsam("vit_tiny", image_size=64, volumetric_adapter=True, slab_depth=4)
    for adapter in model.image_encoder.volumetric_adapters.adapters.values():
        torch.nn.init.normal_(adapter.up.weight, std=0.05)  # a trained adapter: its update is not zero
    path = tmp_path / "volumetric.pt"
    torch.save(model.state_dict(), path)
    box = ["--box3d", "10", "8", "2", "30", "28", "7", "--encoder-engine", "torch"]
    output = tmp_path / "slabs.nii.gz"
    assert main(_base(str(path), volume_file, output) + box + ["--volumetric-adapter", "--slab-depth", "4"]) == 0
    assert np.asarray(nib.load(output).dataobj)[:, :, 2:7].any()
    # the same file without the flag is a checkpoint of another network: refused, naming what it holds
    assert main(_base(str(path), volume_file, tmp_path / "plain.nii.gz") + box) == 2
    assert "volumetric_adapters" in caplog.text and not (tmp_path / "plain.nii.gz").exists()
    assert main(["predict", "--image", str(volume_file), "--volumetric-adapter", "--output", str(tmp_path / "x.nii.gz")] + box) == 2
    assert "--volumetric-adapter needs the --checkpoint" in caplog.text
