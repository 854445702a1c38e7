"""Annotation in OHIF, in a real browser: Orthanc (DICOMweb) + the MONAI Label server with the I-MedSAM app
+ OHIF v3 from the monailabel wheel + headless Chromium.

Run with ``make e2e`` (``pytest --e2e tests/e2e``). The tests share one set of services and run in order:
the user's path (study list, MONAI Label mode, two clicks, the mask; OHIF's DICOM SEG export, a known failure
of its OHIF build; the label saved to Orthanc as DICOM SEG), then the bad paths (clicks outside the volume,
the store stopped). Screenshots go to ``docs/ohif/`` (``IMEDSAM_E2E_SCREENSHOTS`` overrides).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient

from ct_series import Phantom, ct_series
from ohif_page import changed, dice, read_nrrd
from ohif_stack import ohif_stack

PHANTOM = Phantom()
PATIENT_NAME = "Phantom, Kidney"  # as OHIF's study list shows Phantom^Kidney
LABEL = "kidney"
# the organ renders at about 217 of 255 in OHIF's default CT window (W 400, L 40), soft tissue at about 128
ORGAN_GREY = 190
APPLIED = "updated the segmentation's scalar data"  # the MONAI Label panel's log line once a result is shown


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with ohif_stack(tmp_path_factory.mktemp("ohif"), ct_series(PHANTOM), LABEL) as services:
        yield services


def slice_of(datasets, image_id: str) -> int:
    """The DICOM slice (``k``, from ``ImagePositionPatient``) of a WADO-RS image id."""
    for k, ds in enumerate(datasets):
        if f"/instances/{ds.SOPInstanceUID}/" in image_id:
            return k
    raise AssertionError(f"{image_id} is not an image of the uploaded series")


def test_two_clicks_in_monai_label_mode_segment_the_organ_on_that_slice(stack):
    ohif = stack.ohif
    ohif.open_study_list()
    ohif.page.locator("span", has_text=PATIENT_NAME).first.wait_for()
    ohif.screenshot("1_study_list")
    ohif.open_in_monai_label_mode(PATIENT_NAME)
    ohif.connect()
    ohif.choose_point_prompts(LABEL)
    ohif.wait_for_notices_to_close()
    ohif.screenshot("2_monai_label_mode")

    before = {name: ohif.viewport_pixels(name) for name in ohif.VIEWPORTS}
    organ_on_screen = before["mpr-axial"].mean(axis=2) > ORGAN_GREY
    rows, columns = np.nonzero(organ_on_screen)
    assert len(rows) > 500, "the organ is not visible in the axial viewport"
    # two foreground clicks at opposite corners of the organ, as the app's users are told to place them
    ohif.click_axial(columns.min(), rows.min())
    ohif.click_axial(columns.max(), rows.max())
    ohif.screenshot("3_two_clicks")

    started = time.monotonic()
    answer = ohif.run_point_prompt()
    assert answer.status == 200, answer.text()
    assert ohif.wait_for_console(APPLIED), "OHIF never applied the infer result to its segmentation"
    ohif.page.wait_for_timeout(1000)  # the next frames draw the overlay
    stack.state["prompt_s"] = time.monotonic() - started
    ohif.screenshot("4_mask")

    # The server's answer: the organ, on the slice the user is looking at, and nothing on any other slice.
    label = read_nrrd(answer.body()) > 0
    assert label.shape == PHANTOM.shape
    volume_index, image_id = ohif.axial_image()
    k = slice_of(stack.datasets, image_id)
    organ = PHANTOM.organ()
    assert label[:, :, k].any(), f"no mask on the prompted slice {k}"
    assert not np.delete(label, k, axis=2).any(), "the mask reaches other slices"
    fit = dice(label[:, :, k], organ[:, :, k])
    neighbours = [dice(label[:, :, k], organ[:, :, n]) for n in (k - 1, k + 1) if 0 <= n < PHANTOM.shape[2]]
    stack.state["dice"] = fit
    assert fit >= 0.85 and fit > max(neighbours), (fit, neighbours)

    # OHIF's own segmentation state: the same voxels, on the slice on screen only.
    per_slice = ohif.labelmap_per_slice()
    assert per_slice[volume_index] == int(label[:, :, k].sum())
    assert sum(per_slice) == per_slice[volume_index]

    # The rendered pixels: the overlay colour covers the organ and stays inside the clicked box ...
    ohif.wait_for_notices_to_close()  # they pop up over the coronal viewport
    after = {name: ohif.viewport_pixels(name) for name in ohif.VIEWPORTS}
    axial = changed(before["mpr-axial"], after["mpr-axial"])
    assert axial[organ_on_screen].mean() >= 0.9, axial[organ_on_screen].mean()
    near_box = np.zeros_like(axial)
    margin = 12  # the click markers are drawn around the clicks
    near_box[rows.min() - margin : rows.max() + margin + 1, columns.min() - margin : columns.max() + margin + 1] = True
    assert axial[~near_box].sum() <= 0.01 * axial.sum(), "overlay drawn away from the prompted organ"
    # ... and the other two planes show it as one slice thick.
    for name in ("mpr-sagittal", "mpr-coronal"):
        changed_rows = np.nonzero(changed(before[name], after[name]).any(axis=1))[0]
        assert len(changed_rows) > 0 and changed_rows.max() - changed_rows.min() <= 8, (name, changed_rows)
    stack.state.update(k=k, mask_voxels=int(label[:, :, k].sum()), nrrd=answer.body())
    assert not ohif.uncaught, ohif.uncaught


@pytest.mark.xfail(
    strict=True,
    reason="OHIF's DICOM SEG export (the OHIF build in monailabel 0.8.5) reads the segmentation's per-image "
    "labelmaps, which the MONAI Label panel leaves empty (it writes the labelmap volume): the export stops with "
    "'Must set the total number of frames via setNumberOfFrames()'. Strict, so the day it works this turns red.",
)
def test_ohif_exports_the_mask_as_dicom_seg(stack):
    assert "k" in stack.state, "needs the mask of the first test"
    outcome = stack.ohif.export_seg("I-MedSAM kidney")
    assert outcome == "stored", outcome


def test_clicks_outside_the_volume_are_refused_and_the_server_keeps_serving(stack):
    ohif, client = stack.ohif, stack.client
    ohif.page.get_by_text("Clear Points", exact=True).click()
    before = ohif.labelmap_per_slice()
    viewport = ohif.viewport("mpr-axial").bounding_box()
    # the black band above the image: inside the viewport, outside the volume
    ohif.click_axial(viewport["width"] * 0.3, 40)
    ohif.click_axial(viewport["width"] * 0.7, 60)
    answer = ohif.run_point_prompt()
    assert answer.status == 400
    detail = answer.json()["detail"]
    assert "lies outside the image" in detail, detail  # the message is in the answer; the panel shows its own
    ohif.page.get_by_text("Failed to Run Inference for Point Prompts").wait_for(timeout=10_000)
    ohif.page.wait_for_timeout(500)  # the notice slides in
    ohif.screenshot("7_click_outside")
    assert ohif.labelmap_per_slice() == before
    assert client.get("/info/").status_code == 200
    assert not ohif.uncaught, ohif.uncaught


def test_the_saved_mask_reaches_orthanc_as_dicom_seg_and_the_image_counts_as_labeled(stack):
    """The label goes to the datastore through MONAI Label's label API, as 3D Slicer's MONAI Label module
    saves it (OHIF's own export fails, see the xfail above): the DICOMweb datastore turns it into DICOM SEG
    with dcmqi and stores it in Orthanc, where training finds it."""
    client, series_uid = stack.client, stack.datasets[0].SeriesInstanceUID
    assert "nrrd" in stack.state, "needs the mask of the first test"
    assert client.get("/datastore/?output=stats").json()["completed"] == 0
    saved = client.put(
        f"/datastore/label?image={series_uid}&tag=final",
        files={"label": ("label.nrrd", stack.state["nrrd"])},
        data={"params": json.dumps({"label_info": [{"name": LABEL, "idx": 1}]})},
    )
    assert saved.status_code == 200, saved.text

    store = DICOMwebClient(stack.store.dicomweb)
    segs = store.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 1, segs
    seg = store.retrieve_series(segs[0]["0020000D"]["Value"][0], segs[0]["0020000E"]["Value"][0])[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.SegmentSequence[0].SegmentLabel == LABEL
    assert int(np.count_nonzero(seg.pixel_array)) == stack.state["mask_voxels"]

    deadline = time.monotonic() + 30  # the datastore caches its labeled-image lookup for a second
    while (stats := client.get("/datastore/?output=stats").json())["completed"] != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert stats["completed"] == 1 and stats["total"] == 1, stats

    ohif = stack.ohif  # the study list now shows the SEG series beside the CT
    ohif.open_study_list(notice=False)
    ohif.page.locator("span", has_text=PATIENT_NAME).first.click()
    ohif.page.get_by_text("SEG", exact=True).first.wait_for(timeout=30_000)
    ohif.screenshot("6_seg_in_study_list")
    assert not ohif.uncaught, ohif.uncaught


def test_a_stopped_store_gets_a_clear_error_and_the_server_serves_again_when_it_is_back(stack):
    client, ohif = stack.client, stack.ohif
    ohif.open_in_monai_label_mode(PATIENT_NAME)
    stack.store.stop()
    # dicomweb-client retries a failed request for about 30 s before MONAI Label sees the error
    unknown = client.post("/infer/imedsam?image=1.2.3.4&output=json", data={"params": '{"box": [90, 60, 130, 90], "slice": 5}'})
    assert unknown.status_code == 502, unknown.text
    assert f"the DICOMweb store {stack.store.dicomweb} cannot be reached" in unknown.json()["detail"]
    ohif.page.locator("#monailabelServerURL").fill(f"{client.base_url}/")
    ohif.page.locator("button.actionButton").first.click()  # the panel's connect: /info/ reads the store
    ohif.page.get_by_text("Failed to Connect to MONAI Label").wait_for(timeout=90_000)
    ohif.page.wait_for_timeout(500)
    ohif.screenshot("8_store_stopped")
    assert client.server.poll() is None, "the server died"

    stack.store.start()
    assert client.get("/info/").status_code == 200
    assert client.get("/datastore/?output=stats").json()["total"] == 1
    assert not ohif.uncaught, ohif.uncaught
