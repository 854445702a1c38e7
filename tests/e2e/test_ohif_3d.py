"""The 3D task in OHIF on a real CT series: two clicks on one slice of the liver, with ``imedsam_3d`` picked in
the Point Prompts tab, give the liver on every slice.

The series is TotalSegmentator's example abdominal CT (20 axial slices of 512 x 512, JPEG 2000), read from the
shared data folder next to the repository (the test is skipped where it is missing). Its anonymised files have
empty SOP class, study, series and instance UIDs and no patient name, which a DICOMweb store needs and OHIF reads
(without the SOP class it has no viewer for the series): the test sets them on the datasets it uploads (from the
files' meta header where it has them; the files are not changed). It also uploads their pixels uncompressed:
MONAI Label's DICOMweb datastore asks for a series in the default transfer syntax (explicit VR little endian),
and Debian's Orthanc, without its GDCM plugin (``orthanc-gdcm``, which ``make e2e`` does not install), cannot
transcode JPEG 2000 (the infer request gets a 502 that names the store's HTTP 500, "Cannot transcode image" in
Orthanc's log). The reference is TotalSegmentator's own label of the series (a model's output, not a manual one;
liver = 5), stored cropped in-plane: the liver is cut at the crop's edge, so Dice is measured where the label is
defined.
"""

from __future__ import annotations

import json
import re

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from imedsam.inference import load_image_array
from label_server import ROOT
from ohif_page import changed, dice, read_nrrd
from ohif_stack import ohif_stack

DATA = ROOT.parent / "shared" / "data" / "totalseg_example_ct_dicom"
MODEL = "imedsam_3d"
LABEL = "liver"
LIVER = 5  # TotalSegmentator's 'total' class id
PATIENT_NAME = "Example, Liver"  # as OHIF's study list shows Example^Liver
APPLIED = "updated the segmentation's scalar data"  # the MONAI Label panel's log line once a result is shown
OTHER_SLICE = 10  # the rendered mask is checked this many slices away from the clicked one
# measured in this test (the app's default model, lite_medsam with LiteMedSAM's weights): 3D Dice 0.975, 0.974 on
# the other slice, 0.98 between the overlay drawn there and the server's mask
MIN_DICE_3D, MIN_DICE_OTHER_SLICE, MIN_DRAWN_DICE = 0.9, 0.9, 0.9

# reading the series as the server does (MONAI's ITK reader) imports ITK's SWIG bindings and MONAI's optional
# GPU DICOM decoder, which warn about themselves
pytestmark = [
    pytest.mark.filterwarnings("ignore:builtin type swig:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),
]

if not (DATA / "dicom").is_dir():
    pytest.skip(f"the example CT series is not in {DATA}", allow_module_level=True)


def example_series() -> list[pydicom.Dataset]:
    """The series' datasets, with the identifiers its anonymised files lack and their pixels decompressed (in
    memory only)."""
    study, series = (generate_uid(entropy_srcs=["imedsam-e2e", DATA.name, part]) for part in ("study", "series"))
    datasets = []
    for path in sorted((DATA / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Example^Liver", "IMEDSAM-E2E-LIVER"
        ds.decompress()  # JPEG 2000 -> explicit VR little endian, losslessly: see the module's docstring
        datasets.append(ds)
    return datasets


@pytest.fixture(scope="module")
def liver():
    """The liver label on the series' voxels as the server loads them (MONAI: ``(i, j, k)``, RAS affine), where
    the label is defined, and ``to_world``: server voxel -> DICOM/OHIF world point (LPS, mm).

    The label's grid is mapped onto the series' by the two affines, not by the crop offset its README gives:
    the same axes and spacing are checked, and the offset must be whole voxels (it is the README's
    ``crop_lo`` [118, 162, 0])."""
    image = load_image_array(str(DATA / "dicom"))
    label = nibabel.load(DATA / "example_ct_dicom_label.nii.gz")
    label_to_image = np.linalg.inv(np.asarray(image.affine, dtype=float)) @ label.affine
    offset = np.rint(label_to_image[:3, 3]).astype(int)
    assert np.allclose(label_to_image[:3, :3], np.eye(3), atol=1e-4), label_to_image
    assert np.allclose(label_to_image[:3, 3], offset, atol=1e-3), label_to_image
    inside = tuple(slice(lo, lo + n) for lo, n in zip(offset, label.shape))
    mask, defined = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    mask[inside], defined[inside] = np.asanyarray(label.dataobj) == LIVER, True
    to_world = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=float)  # RAS -> LPS
    return mask, defined, to_world


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with ohif_stack(tmp_path_factory.mktemp("ohif3d"), example_series(), LABEL) as services:
        yield services


def apply(matrix: np.ndarray, points) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def drawn_on_axial(ohif, mask2d: np.ndarray, k: int, to_world: np.ndarray, size) -> np.ndarray:
    """Where the axial viewport draws slice ``k``'s ``mask2d`` (``I x J``): its pixels (``size`` rows, columns)
    whose centres fall in a masked voxel."""
    columns, rows = mask2d.shape
    origin, along_i, along_j = ohif.world_to_canvas(apply(to_world, [[0, 0, k], [columns - 1, 0, k], [0, rows - 1, k]]))
    pixels_per_voxel = np.stack([(along_i - origin) / (columns - 1), (along_j - origin) / (rows - 1)], axis=1)
    y, x = np.mgrid[: size[0], : size[1]]
    centres = np.stack([x.ravel() + 0.5, y.ravel() + 0.5], axis=1) - origin
    i, j = np.rint(centres @ np.linalg.inv(pixels_per_voxel).T).astype(int).T
    inside = (i >= 0) & (i < columns) & (j >= 0) & (j < rows)
    drawn = np.zeros(len(i), bool)
    drawn[inside] = mask2d[i[inside], j[inside]]
    return drawn.reshape(size)


def test_two_clicks_with_imedsam_3d_segment_the_liver_on_every_slice(stack, liver):
    mask, defined, to_world = liver
    ohif = stack.ohif
    ohif.open_study_list()
    ohif.open_in_monai_label_mode(PATIENT_NAME)
    ohif.connect()
    ohif.choose_point_prompts(LABEL, model=MODEL)
    ohif.wait_for_notices_to_close()

    # OHIF's volume indices (what the panel sends for clicks, and how it lays the answer's voxels out) are the
    # server's voxel indices: the same world point for each (although the files' instance numbers run against
    # the slices' order)
    columns, rows, slices = mask.shape
    probes = [[0, 0, 0], [columns - 1, 0, 0], [0, rows - 1, 0], [0, 0, slices - 1], [columns // 3, rows // 2, 7]]
    to_index = np.linalg.inv(to_world)
    assert np.allclose(apply(to_index, ohif.axial_index_to_world(probes)), probes, atol=1e-3)

    seed = int(np.argmax(mask.sum(axis=(0, 1))))  # the slice where the liver is largest
    other = seed - OTHER_SLICE if seed >= OTHER_SLICE else seed + OTHER_SLICE
    ohif.scroll_axial_to(other)
    other_before = ohif.viewport_pixels("mpr-axial")
    ohif.scroll_axial_to(seed)
    before = {name: ohif.viewport_pixels(name) for name in ohif.VIEWPORTS}

    # two foreground clicks at opposite corners of the liver on that slice, where the label says it is
    ii, jj = np.nonzero(mask[:, :, seed])
    corners = [[ii.min(), jj.min(), seed], [ii.max(), jj.max(), seed]]
    for x, y in ohif.world_to_canvas(apply(to_world, corners)):
        ohif.click_axial(x, y)
    ohif.screenshot("9_liver_3d_clicks")
    answer = ohif.run_point_prompt()
    assert answer.status == 200, answer.text()
    params = json.loads(re.search(r'name="params"\r\n\r\n(.*?)\r\n--', answer.request.post_data, re.S).group(1))
    assert np.abs(np.array(params["foreground"]) - corners).max() <= 1, (params["foreground"], corners)
    assert ohif.wait_for_console(APPLIED), "OHIF never applied the infer result to its segmentation"

    # The server's answer: the liver on every slice the label has it on, not only the clicked one.
    label = read_nrrd(answer.body()) > 0
    assert label.shape == mask.shape
    per_slice = label.sum(axis=(0, 1))
    assert (per_slice[mask.any(axis=(0, 1))] > 0).all(), per_slice
    fit = dice(label & defined, mask)
    fit_other = dice(label[:, :, other] & defined[:, :, other], mask[:, :, other])
    stack.state.update(dice=fit, dice_other=fit_other, slices=int((per_slice > 0).sum()))
    assert fit >= MIN_DICE_3D and fit_other >= MIN_DICE_OTHER_SLICE, (fit, fit_other)

    # OHIF's segmentation state: the same voxels, slice by slice
    assert ohif.labelmap_per_slice() == per_slice.tolist()

    # The rendered pixels: the sagittal and coronal planes show the mask as a band through the slices ...
    ohif.wait_for_notices_to_close()  # they pop up over the coronal viewport
    for name, axis in (("mpr-sagittal", 0), ("mpr-coronal", 1)):
        plane = int(np.rint(apply(to_index, [ohif.focal_point(name)])[0, axis]))  # the column or row it shows
        crossing = np.nonzero(np.take(label, plane, axis=axis).any(axis=0))[0]  # slices whose mask reaches it
        ends = apply(to_world, [[columns // 2, rows // 2, crossing.min()], [columns // 2, rows // 2, crossing.max()]])
        band = np.ptp(ohif.world_to_canvas(ends, name)[:, 1])  # its pixels from the first to the last of them
        one_slice = band / max(np.ptp(crossing), 1)
        drawn_rows = np.nonzero(changed(before[name], ohif.viewport_pixels(name)).any(axis=1))[0]
        stack.state[name] = (int(np.ptp(drawn_rows)) if len(drawn_rows) else 0, round(float(band), 1))
        assert len(drawn_rows) and np.ptp(drawn_rows) >= band - one_slice, (name, drawn_rows, band)
    # ... and scrolled to another slice, the overlay is drawn where the server's mask is
    ohif.scroll_axial_to(other)
    drawn = changed(other_before, ohif.viewport_pixels("mpr-axial"))
    expected = drawn_on_axial(ohif, label[:, :, other], other, to_world, drawn.shape)
    stack.state["drawn_dice"] = dice(drawn, expected)
    ohif.screenshot("10_liver_3d_other_slice")
    assert stack.state["drawn_dice"] >= MIN_DRAWN_DICE, stack.state
    print("measured:", stack.state)
    assert not ohif.uncaught, ohif.uncaught
