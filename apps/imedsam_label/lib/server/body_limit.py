"""A limit on the size of a request's body, answered with 413 before the body is read.

Without it, a request that declares a 2 GiB body is spooled to ``TMPDIR`` while it trickles in, and only
then refused (or not). :class:`RequestBodyLimit` is a plain ASGI middleware, put in front of everything else
when the server starts (``main.IMedSAMApp.server_mode``):

- a ``Content-Length`` above the limit is answered 413 at once, from the request's headers: the app never
  asks for the body, so the server reads none of it (a client that sent ``Expect: 100-continue`` is not
  even asked to send it);
- a body without ``Content-Length`` (``Transfer-Encoding: chunked``) is counted as the app reads it and
  cut off at the limit with the same 413.

Each 413 closes the connection (``Connection: close``). The limit is ``--conf max_request_mb`` (MiB); by
default (:func:`default_request_limit`) it holds the largest image the app accepts (``max_image_voxels``
float32 voxels, ``max_image_pixels`` 4-channel 16-bit pixels) or a checkpoint of the served network, whichever is
larger, plus 64 MiB for the form around it.
"""

from __future__ import annotations

import json
import logging
import math

from imedsam.data import headers, pictures

logger = logging.getLogger(__name__)

__all__ = ["RequestBodyLimit", "default_request_limit", "MIB"]

MIB = 1 << 20
#: room for the multipart envelope and the form fields around the largest file
ENVELOPE_BYTES = 64 * MIB


def default_request_limit(network=None) -> int:
    """The default limit in bytes: the largest image the app accepts (a volume of
    :data:`imedsam.data.headers.MAX_IMAGE_VOXELS` float32 voxels, a picture of
    :data:`imedsam.data.pictures.MAX_IMAGE_PIXELS` 4-channel 16-bit pixels, both stored uncompressed) or a
    checkpoint of ``network`` (its state dict's bytes), whichever is larger, plus :data:`ENVELOPE_BYTES`;
    rounded up to whole MiB."""
    largest = max(headers.MAX_IMAGE_VOXELS * 4, pictures.MAX_IMAGE_PIXELS * 8)
    if network is not None:
        checkpoint = sum(t.numel() * t.element_size() for t in network.state_dict().values())
        largest = max(largest, checkpoint)
    return math.ceil((largest + ENVELOPE_BYTES) / MIB) * MIB


def _describe(limit: int) -> str:
    return f"{limit:,} bytes ({limit / MIB:g} MiB; the server's --conf max_request_mb)"


class RequestBodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes is answered 413 (JSON ``detail`` naming the
    limit) before it is read, or, without ``Content-Length``, as soon as the part read passes the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def _refuse(self, send, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope.get("headers", ()) if name.lower() == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:  # the HTTP server refuses a malformed Content-Length before the app sees it
                length = None
            if length is not None and length > self.limit:
                logger.warning("%s %s: refused a body of %s bytes (limit %s)", scope["method"], scope["path"], f"{length:,}", f"{self.limit:,}")
                await self._refuse(send, f"the request body is {length:,} bytes; the limit is {_describe(self.limit)}")
                return
            # the HTTP server delivers no more than the declared length
            await self.app(scope, receive, send)
            return

        received = 0
        refused = False
        started = False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    logger.warning("%s %s: cut off a body without Content-Length at %s bytes", scope["method"], scope["path"], f"{self.limit:,}")
                    if not started:
                        await self._refuse(send, f"the request body is larger than the limit of {_describe(self.limit)}")
                    # to the app, the client has gone: it stops reading, and what it answers is dropped
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the app failed on the body it was denied (a form cut short): the 413 has answered the request
            logger.debug("%s %s: the app's error after the body was cut off", scope["method"], scope["path"], exc_info=True)
