"""Serve the app as ``monailabel start_server`` does, with uvicorn bounded against slow, idle and too many clients.

    python apps/imedsam_label/serve.py --studies /data/my_images --port 8000 [--conf KEY VALUE ...]

It takes ``monailabel start_server``'s arguments (``--app`` defaults to this folder, ``--host`` to 127.0.0.1) and
runs the same thing: MONAI Label's settings are set from them the same way (``monailabel.main.Main``), and
uvicorn serves the same FastAPI app (``monailabel.app:app``), whose startup loads this app. What differs is how
uvicorn treats connections:

- ``--limit_concurrency`` (64): with this many connections open or requests in progress, a new request is
  answered 503 at once (uvicorn's own limit);
- ``--max_connections`` (4 x limit_concurrency, at most half the process's open-file limit less the backlog): a
  connection beyond it is answered 503 and closed as soon as it is accepted, so that idle connections cannot use
  up the process's file descriptors (with 1024, 1100 idle connections had stopped ``monailabel start_server``);
- ``--backlog`` (128; uvicorn's default is 2048): the listen queue, and how many connections asyncio accepts at
  a time before any is refused; asyncio logs a traceback for each one it cannot accept, up to this many at a time,
  when the process is out of files;
- ``--header_timeout`` (10 s): a connection that has not sent a complete request head this long after it opened,
  or after the first byte of its next request, is closed (uvicorn has no such timeout: a silent connection was
  never closed, one that sends a byte a second was kept forever);
- ``--body_timeout`` (30 s): a request whose body stops arriving for this long is closed (the gap between two
  reads, as nginx's ``client_body_timeout``; the server's own back-pressure does not count);
- ``--timeout_keep_alive`` (5 s): an idle connection between requests is closed after this long;
- ``--max_header_bytes`` (32768): a request head (or chunk header) still incomplete past this size is a 400
  (h11's ``max_incomplete_event_size``: what the server holds of a head it is waiting for; a complete head that
  arrives in one read is not measured);
- the warnings these limits cause, uvicorn's and asyncio's too, are logged at most once per 10 s, with a count,
  so that a flood of clients cannot fill the disk with the log.

The size of a request's body is the app's own limit (``--conf max_request_mb``, :mod:`lib.server.body_limit`),
which ``monailabel start_server`` applies too. The app's README (**Serving it bounded**) has an nginx
configuration for a server that other machines reach.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

APP_DIR = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger("imedsam_label.serve")

DEFAULTS = dict(
    limit_concurrency=64,
    header_timeout=10.0,
    body_timeout=30.0,
    timeout_keep_alive=5,
    max_header_bytes=32 * 1024,
    backlog=128,
)
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: 44\r\n\r\nthe server has too many connections open now"
)


class Tally:
    """Counts an event and logs it at most once per ``interval`` seconds: the first at once, later ones with
    how many there were since the previous line."""

    def __init__(self, message: str, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.message, self.interval, self.level = message, interval, level
        self.count = 0
        self.last: float | None = None

    def add(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.last is None or now - self.last >= self.interval:
            since = "since the server started" if self.last is None else f"in the last {now - self.last:.0f} s"
            logger.log(self.level, "%s: %d %s", self.message, self.count, since)
            self.count = 0
            self.last = now


class RateLimitedLog(logging.Filter):
    """Lets a record whose message starts with one of ``messages`` through at most once per ``interval`` seconds
    (per message)."""

    def __init__(self, messages: tuple[str, ...], interval: float = 10.0) -> None:
        super().__init__()
        self.messages, self.interval = messages, interval
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        message = next((m for m in self.messages if text.startswith(m)), None)
        if message is None:
            return True
        now = time.monotonic()
        if now - self.last.get(message, -float("inf")) < self.interval:
            self.dropped[message] = self.dropped.get(message, 0) + 1
            return False
        dropped = self.dropped.pop(message, 0)
        if dropped:
            record.msg, record.args = f"{text} ({dropped} more not logged in the last {self.interval:.0f} s)", ()
        self.last[message] = now
        return True


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a time limit on a request's head and on gaps in its body, and a cap on
    the connections open. :func:`bounded_protocol` makes one with its limits set."""

    header_timeout: float = DEFAULTS["header_timeout"]
    body_timeout: float = DEFAULTS["body_timeout"]
    max_connections: int | None = None
    refused = Tally("refused connections above --max_connections")
    timed_out = Tally("closed connections that sent no complete request head within --header_timeout", level=logging.INFO)
    stalled = Tally("closed connections whose request body stalled for --body_timeout", level=logging.INFO)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer = None
        self._body_timer = None

    # -- where the connection is ------------------------------------------------------------------------
    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _reading_body(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle.more_body and not cycle.response_complete and not cycle.disconnected

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # -- the protocol's events ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.refused.add()
            transport.write(_BUSY)
            transport.close()
            return
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and self._head_timer is None:
            # the first bytes of the next request: its head must be complete within header_timeout
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        super().data_received(data)
        if not self._between_requests():
            self._cancel("_head_timer")
        if self._reading_body():
            self._cancel("_body_timer")
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_stalled)
        else:
            self._cancel("_body_timer")

    def connection_lost(self, exc) -> None:
        self._cancel("_head_timer")
        self._cancel("_body_timer")
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.timed_out.add()
            self._close()

    def _body_stalled(self) -> None:
        self._body_timer = None
        if not self._reading_body() or self.transport.is_closing():
            return
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # the server is not reading (its buffer is full, or the app has not asked for the body yet): not
            # the client's delay
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_stalled)
            return
        self.stalled.add()
        self._close()  # the app reads an http.disconnect


def bounded_protocol(header_timeout: float, body_timeout: float, max_connections: int | None) -> type[BoundedH11Protocol]:
    """A :class:`BoundedH11Protocol` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout), "max_connections": max_connections},
    )


def default_max_connections(limit_concurrency: int, backlog: int) -> int:
    """4 x ``limit_concurrency``, but no more than half the process's open-file limit less ``backlog`` (asyncio
    accepts up to ``backlog`` connections at a time before any is refused; the other half is for the model's
    files, logs, training subprocesses and the like)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = soft // 2 - backlog if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, min(4 * limit_concurrency, cap))


def argument_parser() -> argparse.ArgumentParser:
    from monailabel.main import Main

    parser = argparse.ArgumentParser(
        "serve.py", description="monailabel start_server for the I-MedSAM app, with bounded connections (see the module's doc)"
    )
    Main().args_start_server(parser)  # monailabel start_server's own arguments
    parser.set_defaults(app=APP_DIR, host="127.0.0.1", limit_concurrency=DEFAULTS["limit_concurrency"])
    parser.add_argument("--max_connections", type=int, default=None,
                        help="connections open at most (default: 4 x limit_concurrency, at most half the open-file limit less the backlog)")
    parser.add_argument("--backlog", type=int, default=DEFAULTS["backlog"], help="connections accepted at a time, and the listen queue (default 128)")
    parser.add_argument("--header_timeout", type=float, default=DEFAULTS["header_timeout"], help="seconds for a request's head (default 10)")
    parser.add_argument("--body_timeout", type=float, default=DEFAULTS["body_timeout"], help="seconds a request body may stall (default 30)")
    parser.add_argument("--timeout_keep_alive", type=int, default=DEFAULTS["timeout_keep_alive"], help="seconds an idle connection is kept (default 5)")
    parser.add_argument("--max_header_bytes", type=int, default=DEFAULTS["max_header_bytes"], help="largest incomplete request head held, in bytes (default 32768)")
    return parser


def uvicorn_config(args: argparse.Namespace, log_config: str | None = None) -> uvicorn.Config:
    """The uvicorn configuration ``args`` asks for: ``monailabel start_server``'s, bounded."""
    for name in ("limit_concurrency", "max_header_bytes", "timeout_keep_alive", "backlog"):
        if getattr(args, name) is None or getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be a positive whole number, got {getattr(args, name)!r}")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name} must be a positive number of seconds, got {getattr(args, name)!r}")
    max_connections = args.max_connections
    if max_connections is None:
        max_connections = default_max_connections(args.limit_concurrency, args.backlog)
    if max_connections < 1:
        raise SystemExit(f"--max_connections must be a positive whole number, got {max_connections!r}")
    config = uvicorn.Config(
        args.uvicorn_app,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
        log_level=args.log_level,
        log_config=log_config,
        use_colors=True,
        access_log=args.access_log,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile_password=args.ssl_keyfile_password,
        ssl_ca_certs=args.ssl_ca_certs,
        http=bounded_protocol(args.header_timeout, args.body_timeout, max_connections),
        limit_concurrency=args.limit_concurrency,
        timeout_keep_alive=args.timeout_keep_alive,
        h11_max_incomplete_event_size=args.max_header_bytes,
        backlog=args.backlog,
    )
    config.max_connections = max_connections
    return config


def main(argv: list[str] | None = None) -> None:
    from monailabel.main import Main
    from monailabel.utils.others.generic import init_log_config

    args = argument_parser().parse_args(argv)
    if args.workers not in (None, 1):
        raise SystemExit("--workers: serve.py runs one process (each worker would load the model and its own datastore)")
    start = Main()
    start.start_server_validate_args(args)
    start.start_server_init_settings(args)  # MONAI Label's settings and environment, as start_server sets them
    log_config = init_log_config(args.log_config, args.app, "app.log", args.verbose)
    if args.dryrun:
        return
    config = uvicorn_config(args, log_config)  # configures logging
    # uvicorn warns once per request over limit_concurrency and per malformed request; a flood is one line per 10 s
    logging.getLogger("uvicorn.error").addFilter(RateLimitedLog(("Exceeded concurrency limit.", "Invalid HTTP request received.")))
    # and asyncio logs a traceback for every connection it cannot accept when the process is out of files
    logging.getLogger("asyncio").addFilter(RateLimitedLog(("socket.accept() out of system resource",)))
    logger.info(
        "bounded: limit_concurrency %d, max_connections %d, backlog %d, header_timeout %g s, body_timeout %g s, "
        "keep-alive %d s, incomplete request heads %d bytes at most",
        args.limit_concurrency, config.max_connections, args.backlog, args.header_timeout, args.body_timeout,
        args.timeout_keep_alive, args.max_header_bytes,
    )  # fmt: skip
    uvicorn.Server(config).run()


if __name__ == "__main__":
    sys.exit(main())
