"""Clear answers when the DICOMweb store behind the server fails.

With ``--studies http://.../dicom-web`` every image is fetched from the store when a request needs it, so a
store that is down, refuses a query or sends something that is not DICOM would surface as a bare 500 from
deep inside MONAI Label. :func:`install_store_error_answers` registers FastAPI exception handlers that answer
such requests with the status and a message naming the store; the server keeps serving.
"""

from __future__ import annotations

import logging

import requests
from fastapi.responses import JSONResponse
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)


def store_error_answer(store_url: str, exc: Exception) -> tuple[int, str]:
    """The status and message for ``exc``, raised while talking to the store at ``store_url``."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 404:
            return 404, f"the DICOMweb store {store_url} has no such study or series ({exc.request.url if exc.request else exc})"
        return 502, f"the DICOMweb store {store_url} refused the request with HTTP {status}: {exc}"
    if isinstance(exc, requests.Timeout):
        return 504, f"the DICOMweb store {store_url} did not answer in time: {exc}"
    if isinstance(exc, requests.ConnectionError):
        return 502, f"the DICOMweb store {store_url} cannot be reached (is it running?): {exc}"
    if isinstance(exc, InvalidDicomError):
        return 502, f"the DICOMweb store {store_url} sent an object that is not DICOM: {exc}"
    return 502, f"the DICOMweb store {store_url} failed: {exc}"


def install_store_error_answers(server, store_url: str) -> None:
    """Answer store failures on ``server`` (the running FastAPI app) with :func:`store_error_answer`."""

    async def answer(request, exc):
        status, message = store_error_answer(store_url, exc)
        logger.error("%s %s: %s", request.method, request.url.path, message)
        return JSONResponse({"detail": message}, status_code=status)

    for kind in (requests.RequestException, InvalidDicomError):
        server.add_exception_handler(kind, answer)
    # The middleware stack, which holds the exception handlers, was built for the startup request: rebuild it.
    server.middleware_stack = server.build_middleware_stack()
    logger.info("DICOMweb store %s: its failures are answered with 502/504 and a message naming it", store_url)
