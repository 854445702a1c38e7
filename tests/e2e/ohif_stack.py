"""The services one browser test file runs against, all on 127.0.0.1 and started and stopped by the test: Orthanc
holding the file's DICOM series, the MONAI Label server with the I-MedSAM app reading it over DICOMweb, and
headless Chromium on a page for OHIF."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from dicomweb_client.api import DICOMwebClient

from label_server import ROOT, label_server
from ohif_page import OhifSession, chromium_executable, screenshot_dir
from orthanc import orthanc

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.fail("Playwright is not installed: `make e2e` installs it (pip install -e '.[e2e]')", pytrace=False)

APP = ROOT / "apps" / "imedsam_label"


@contextmanager
def ohif_stack(work: Path, datasets: list, label: str):
    """Store ``datasets`` in a new Orthanc, serve the app on it with segment name ``label``, and open a browser
    page; yields ``store``, ``client`` (on the server), ``datasets``, ``ohif`` (:class:`OhifSession`) and a
    ``state`` dict for tests that build on each other. Everything is stopped on exit."""
    settings = {
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicom-cache"),
        "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "1",  # labeled-image lookups are cached this many seconds
    }
    with orthanc(work / "orthanc") as store:
        DICOMwebClient(store.dicomweb).store_instances(datasets)
        with label_server(APP, store.dicomweb, work, conf=["--conf", "label", label], env=settings) as client:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium_executable(),
                    # software WebGL: OHIF's viewports render with SwiftShader in a headless, GPU-less browser
                    args=["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
                )
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(60_000)
                ohif = OhifSession(page, str(client.base_url), screenshot_dir(ROOT))
                try:
                    yield SimpleNamespace(store=store, client=client, datasets=datasets, ohif=ohif, state={})
                finally:
                    browser.close()
