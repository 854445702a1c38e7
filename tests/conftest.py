import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from imedsam.networks import IMedSAM

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", help="run the browser tests in tests/e2e (make e2e), which need Orthanc and Chromium")


def pytest_configure(config):
    # OpenVINO graphs that tests convert (Predictor's default engine) stay out of the user's ~/.cache; the
    # servers the tests start inherit the variable
    if "IMEDSAM_CACHE_DIR" not in os.environ:
        os.environ["IMEDSAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="imedsam-test-cache-")


def pytest_ignore_collect(collection_path, config):
    # the browser tests need Debian packages and a browser: `make e2e` runs them, `make test` does not
    if not config.getoption("--e2e") and (collection_path == E2E_DIR or E2E_DIR in collection_path.parents):
        return True
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def tiny_model(**kwargs) -> IMedSAM:
    """A small random-init I-MedSAM whose decoder has had its BatchNorm statistics moved off the identity,
    so that eval-mode tests exercise them."""
    options = {"encoder": "vit_tiny", "image_size": 64}
    options.update(kwargs)
    model = IMedSAM(**options)
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
