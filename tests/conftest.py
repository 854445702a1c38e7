import os
import sys
import tempfile
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam.networks import IMedSAM, build_imedsam

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", help="run the browser tests in tests/e2e (make e2e), which need Orthanc and Chromium")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a file that takes minutes (a server, a bundle run, real weights or images); -m 'not slow' skips it")
    # OpenVINO graphs that tests convert (Predictor's default engine) stay out of the user's ~/.cache; the
    # servers the tests start inherit the variable
    if "IMEDSAM_CACHE_DIR" not in os.environ:
        os.environ["IMEDSAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="imedsam-test-cache-")
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is not None:
        # pytest-xdist (make test runs -n 2): each worker converts into a cache of its own, and the workers
        # share the cores rather than each starting a thread per core, for itself and for the servers and
        # bundle runs it starts (they read OMP_NUM_THREADS)
        os.environ["IMEDSAM_CACHE_DIR"] = os.path.join(os.environ["IMEDSAM_CACHE_DIR"], worker)
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_ignore_collect(collection_path, config):
    # the browser tests need Debian packages and a browser: `make e2e` runs them, `make test` does not
    if not config.getoption("--e2e") and (collection_path == E2E_DIR or E2E_DIR in collection_path.parents):
        return True
    return None


def pytest_collection_modifyitems(session, config, items):
    # Files marked slow (minutes each: a server retraining LiteMedSAM, server restarts, real-image checks, bundle
    # runs) start first, so that the two workers of `make test` finish together rather than one running the last
    # long file alone; the sort is stable, so each file keeps its own order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "imedsam_label"


def import_app_module(name: str):
    """A module of the MONAI Label app (``lib.…``), imported as the server imports it: from the app's folder."""
    sys.path.insert(0, str(APP_DIR))
    try:
        return import_module(name)
    finally:
        sys.path.remove(str(APP_DIR))


def tiny_model(**kwargs) -> IMedSAM:
    """A small random-init I-MedSAM whose decoder has had its BatchNorm statistics moved off the identity,
    so that eval-mode tests exercise them."""
    options = {"encoder": "vit_tiny", "image_size": 64}
    options.update(kwargs)
    model = build_imedsam(options.pop("encoder"), **options)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture
def model() -> IMedSAM:
    return tiny_model().eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Two different images, 72 x 88."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 72, 88, generator=generator)


@pytest.fixture
def boxes() -> torch.Tensor:
    return torch.tensor([[[10.0, 12.0, 60.0, 50.0]], [[30.0, 5.0, 80.0, 70.0]]])
