"""The app's answers when its DICOMweb store fails (the browser test, tests/e2e, drives them on a real
Orthanc; these cases run without one)."""

import pytest
import requests
from pydicom.errors import InvalidDicomError

from conftest import import_app_module

STORE = "http://127.0.0.1:8042/dicom-web"


@pytest.fixture(scope="module")
def dicomweb():
    return import_app_module("lib.server.dicomweb")


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    request = requests.Request("GET", f"{STORE}/studies/1.2/series/3.4").prepare()
    response.request = request
    return requests.HTTPError(f"{status} error", response=response, request=request)


@pytest.mark.parametrize(
    "error, status, words",
    [
        (requests.ConnectionError("Connection refused"), 502, "cannot be reached"),
        (requests.ReadTimeout("read timed out"), 504, "did not answer in time"),
        (http_error(404), 404, "has no such study or series"),
        (http_error(500), 502, "refused the request with HTTP 500"),
        (InvalidDicomError("missing DICM prefix"), 502, "not DICOM"),
    ],
)
def test_store_failures_get_a_status_and_a_message_naming_the_store(dicomweb, error, status, words):
    answer_status, message = dicomweb.store_error_answer(STORE, error)
    assert answer_status == status
    assert STORE in message and words in message
