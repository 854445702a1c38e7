"""OHIF v3 (the build inside the ``monailabel`` wheel, served at ``/ohif/``) driven as a user drives it, with
Playwright on Debian's Chromium (no browser download)."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser")

# OHIF keeps its services in React props, not in globals: find the MONAI Label panel's props from its server
# field and keep them as window.__ohif, for reading the segmentation state and running OHIF's own commands.
_FIND_PANEL_PROPS = """() => {
  const field = document.querySelector('#monailabelServerURL');
  const key = Object.keys(field).find(k => k.startsWith('__reactFiber$'));
  for (let fiber = field[key]; fiber; fiber = fiber.return) {
    const props = fiber.memoizedProps;
    if (props && props.commandsManager && props.servicesManager) { window.__ohif = props; return true; }
  }
  return false;
}"""

_LABELMAP_PER_SLICE = """() => {
  const volume = window.__ohif.servicesManager.services.segmentationService.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const [columns, rows, slices] = volume.dimensions;
  const counts = [];
  for (let k = 0; k < slices; k++) {
    let n = 0;
    for (let i = k * columns * rows; i < (k + 1) * columns * rows; i++) if (data[i]) n++;
    counts.push(n);
  }
  return counts;
}"""

_AXIAL_IMAGE = """() => {
  const viewport = window.__ohif.servicesManager.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
  return [viewport.getCurrentImageIdIndex(), viewport.getCurrentImageId()];
}"""


# the axial viewport's volume (the one the MONAI Label panel turns clicks into indices with), and a viewport's camera
_AXIAL_INDEX_TO_WORLD = """(points) => {
  const info = window.__ohif.servicesManager.services.cornerstoneViewportService.getViewportInfo('mpr-axial');
  const {imageData} = info.viewportData.data[0].volume;
  return points.map(point => Array.from(imageData.indexToWorld(point)));
}"""

_WORLD_TO_CANVAS = """([name, points]) => {
  const viewport = window.__ohif.servicesManager.services.cornerstoneViewportService.getCornerstoneViewport(name);
  return points.map(point => Array.from(viewport.worldToCanvas(point)));
}"""


_FOCAL_POINT = """(name) => Array.from(
  window.__ohif.servicesManager.services.cornerstoneViewportService.getCornerstoneViewport(name).getCamera().focalPoint
)"""


def chromium_executable() -> str:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is not installed: run `make e2e` (apt-get install chromium)")


def rgb(png: bytes) -> np.ndarray:
    """``H x W x 3`` int array of a screenshot."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Pixels of two screenshots that differ visibly (an overlay drawn over the image)."""
    return np.abs(after - before).sum(axis=2) > 30


def read_nrrd(body: bytes) -> np.ndarray:
    """``(I, J, K)`` array of an uncompressed 8-bit NRRD (the infer answer OHIF asks for)."""
    header, _, raw = body.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    assert fields["encoding"] == "raw" and fields["type"] == "unsigned char", fields
    sizes = [int(v) for v in fields["sizes"].split()]
    return np.frombuffer(raw, dtype=np.uint8).reshape(sizes[::-1]).transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


class OhifSession:
    """One browser page on OHIF, logging the page's console and uncaught errors, saving screenshots to
    ``shots``."""

    VIEWPORTS = ("mpr-axial", "mpr-sagittal", "mpr-coronal")

    def __init__(self, page, base_url: str, shots: Path) -> None:
        self.page, self.base_url, self.shots = page, base_url.rstrip("/"), shots
        self.console: list[str] = []
        self.uncaught: list[str] = []
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.uncaught.append(str(error)))

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def viewport(self, name: str):
        return self.page.locator(f'[data-viewport-uid="{name}"]')

    def viewport_pixels(self, name: str) -> np.ndarray:
        return rgb(self.viewport(name).screenshot())

    def open_study_list(self, notice: bool = True) -> None:
        self.page.goto(f"{self.base_url}/ohif/", wait_until="networkidle", timeout=120_000)
        if notice:
            self.page.get_by_text("Confirm and Hide").click()  # OHIF's investigational-use notice, shown once

    def open_in_monai_label_mode(self, patient_name: str) -> None:
        mode = self.page.get_by_role("button", name="MONAI Label")
        if not mode.is_visible():  # the study's row shows the modes once expanded
            self.page.locator("span", has_text=patient_name).first.click()
        mode.click()
        self.page.locator("#monailabelServerURL").wait_for(timeout=60_000)
        self.viewport("mpr-axial").locator("canvas").wait_for(timeout=60_000)

    def connect(self) -> None:
        """Type the server's address into the panel and connect, as the panel asks."""
        self.page.locator("#monailabelServerURL").fill(f"{self.base_url}/")
        self.page.locator("button.actionButton").first.click()
        self.page.get_by_text("Point Prompts", exact=True).first.wait_for(timeout=60_000)
        assert self.page.evaluate(_FIND_PANEL_PROPS), "OHIF's MONAI Label panel props were not found"

    def choose_point_prompts(self, label: str, model: str | None = None) -> None:
        """Open the Point Prompts tab, pick ``model`` there (default: the first in its list) and the label."""
        self.page.get_by_text("Point Prompts", exact=True).first.click()
        if model is not None:  # picking a model clears the tab's label and clicks: pick it first
            selector = self.page.locator(".modelSelector", has=self.page.locator("button[title='Run PointPrompts']"))
            selector.locator("select").select_option(model)
        self.page.locator("tr.clickable-row", has_text=label).click()

    def click_axial(self, x: float, y: float) -> None:
        """A click at ``(x, y)`` pixels of the axial viewport."""
        box = self.viewport("mpr-axial").bounding_box()
        self.page.mouse.click(box["x"] + x, box["y"] + y)
        # as a person clicks: Cornerstone holds a click for 400 ms to tell it from a double click, and a second
        # click inside that window is lost
        self.page.wait_for_timeout(1000)

    def run_point_prompt(self, timeout_s: float = 300):
        """Click the Point Prompts tab's Run; returns the infer response (Playwright ``Response``)."""
        with self.page.expect_response(lambda r: "/infer/" in r.url, timeout=timeout_s * 1000) as answer:
            self.page.locator("button[title='Run PointPrompts']").click()
        return answer.value

    def wait_for_console(self, text: str, timeout_s: float = 30) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.console):
                return True
            self.page.wait_for_timeout(200)
        return False

    def wait_for_notices_to_close(self, timeout_s: float = 15) -> None:
        """Wait until OHIF's notifications (MONAI Label's last 2-10 s) have closed."""
        deadline = time.monotonic() + timeout_s
        while self.page.locator("[data-sonner-toast]").count() and time.monotonic() < deadline:
            self.page.wait_for_timeout(250)
        self.page.wait_for_timeout(500)  # their fade-out

    def labelmap_per_slice(self) -> list[int]:
        """Non-zero voxels of OHIF's segmentation (labelmap '1') on each slice of its volume."""
        return self.page.evaluate(_LABELMAP_PER_SLICE)

    def axial_image(self) -> tuple[int, str]:
        """The axial viewport's slice, as an index into OHIF's volume, and that image's WADO-RS id."""
        index, image_id = self.page.evaluate(_AXIAL_IMAGE)
        return index, image_id

    def scroll_axial_to(self, index: int, max_steps: int = 200) -> None:
        """Scroll the axial viewport with the mouse wheel, as a user does, until it shows slice ``index`` of
        OHIF's volume (:meth:`axial_image`)."""
        box = self.viewport("mpr-axial").bounding_box()
        self.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        step = 100  # one wheel notch: one slice; which way is found from the first notch
        for _ in range(max_steps):
            current = self.axial_image()[0]
            if current == index:
                self.page.wait_for_timeout(500)  # the frame of that slice
                return
            self.page.mouse.wheel(0, step if index > current else -step)
            self.page.wait_for_timeout(200)
            if abs(self.axial_image()[0] - index) > abs(current - index):
                step = -step
        raise AssertionError(f"the axial viewport did not reach slice {index}: it shows {self.axial_image()[0]}")

    def axial_index_to_world(self, indices) -> np.ndarray:
        """World (patient, mm) points of ``(i, j, k)`` indices of OHIF's volume, the indices the MONAI Label
        panel sends for clicks."""
        return np.array(self.page.evaluate(_AXIAL_INDEX_TO_WORLD, [list(map(float, p)) for p in indices]))

    def world_to_canvas(self, points, viewport: str = "mpr-axial") -> np.ndarray:
        """``(x, y)`` pixels of ``viewport`` where world points are drawn at its current camera."""
        return np.array(self.page.evaluate(_WORLD_TO_CANVAS, [viewport, [list(map(float, p)) for p in points]]))

    def focal_point(self, viewport: str) -> np.ndarray:
        """The world point at the centre of ``viewport``'s camera, on the plane it shows."""
        return np.array(self.page.evaluate(_FOCAL_POINT, viewport))

    def export_seg(self, series_description: str, timeout_s: float = 60) -> str:
        """Store the segmentation as DICOM SEG through OHIF's own ``storeSegmentation`` command (the command
        behind the segmentation panel's export; the MONAI Label mode shows no such panel), naming it in
        OHIF's report dialog as a user does. Returns ``"stored"`` or the command's error."""
        self.page.evaluate(
            """() => {
              window.__segExport = null;
              Promise.resolve(window.__ohif.commandsManager.run('storeSegmentation', {segmentationId: '1'}))
                .then(() => { window.__segExport = 'stored'; }, error => { window.__segExport = String(error); });
            }"""
        )
        dialog_field = self.page.get_by_text("Enter the report name").locator("xpath=..").locator("input")
        dialog_field.fill(series_description)
        self.screenshot("5_export_dialog")
        self.page.get_by_role("button", name="Save").click()
        self.page.wait_for_function("() => window.__segExport !== null", timeout=timeout_s * 1000)
        return self.page.evaluate("() => window.__segExport")


def screenshot_dir(root: Path) -> Path:
    return Path(os.environ.get("IMEDSAM_E2E_SCREENSHOTS", root / "docs" / "ohif"))
