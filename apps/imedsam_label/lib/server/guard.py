"""Requests checked before MONAI Label sees them, and the two endpoints that do heavy work off the event loop.

MONAI Label 0.8.5 joins request ids and tags into paths, answers malformed ``params`` with a 500, runs an
infer on the server's event loop (every other request waits for it) and leaves temporary files behind when
a request fails. The app does not patch MONAI Label; it puts two things in front of it when the server
starts (:func:`install`):

- :class:`RequestGuard`, a small ASGI middleware that checks the ids and tags in every ``/datastore`` and
  ``/infer`` query before routing: a tag must be a plain name (400), an image id must name an image in the
  datastore (the same 404 whether or not a file of that name exists anywhere);
- its own ``POST /infer/{model}``, ``PUT /datastore/label``, ``PUT /datastore/image`` (and MONAI Label's older
  ``PUT /datastore/``), ``PUT /model/{model}`` and ``POST /train/{model}`` routes, ahead of MONAI Label's: they
  check ``params`` (a training's settings before a run is queued), check uploaded images, labels and
  checkpoints before anything is replaced, keep uploads in a temporary folder that is removed however the
  request ends, and run the work in a worker thread, so ``/info/`` and other requests are answered while an
  image is segmented or a ``run_sync`` training runs;
- an answer for a disk that refuses a write anywhere in the server: 507 for a full disk, 503 for other I/O
  errors, naming what could not be written but no server path (:func:`lib.server.storage.storage_problem`).

Whatever the datastore (a local folder or a DICOMweb store), :func:`install_off_loop` puts MONAI Label's own
routes that do blocking work (:data:`BLOCKING_ROUTES`: a ``run_sync`` training or scoring, an active-learning
pick, the dataset zip, a batch infer, an infer, image and label transfers) ahead of themselves again, each
running MONAI Label's endpoint unchanged in a worker thread: same parameters, same answers and errors, and the
event loop keeps answering ``/info/``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import pathlib
import re
import tempfile
from typing import Any
from urllib.parse import parse_qs

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.infer import send_response
from monailabel.endpoints.user.auth import RBAC, User
from starlette.concurrency import run_in_threadpool

from lib.server.datastore import (
    LABEL_POLICIES,
    PLAIN_NAME,
    SUFFIXES,
    CheckedDatastore,
    DatastoreRequestError,
    check_new_image_id,
    check_tag,
    suffix_of,
)
from lib.server.storage import storage_problem

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCKING_ROUTES", "RequestGuard", "install", "install_label_save", "install_model_upload", "install_off_loop", "parse_params",
]  # fmt: skip

#: the largest ``params`` form field accepted, in characters
MAX_PARAMS_CHARS = 1_000_000
#: file name endings accepted for uploaded images and labels: the datastore's own list, which it scans for
UPLOAD_SUFFIXES = SUFFIXES
_DEVICE = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")
# params keys that would name server files or override the query; the query and uploads do that
_FORBIDDEN_PARAMS = ("image", "label", "file", "session")


def parse_params(text: str | None) -> dict[str, Any]:
    """The ``params`` form field as a dict, or a 400 that says what is wrong with it."""
    if text is None or text == "":
        return {}
    if len(text) > MAX_PARAMS_CHARS:
        raise HTTPException(status_code=400, detail=f"params is {len(text)} characters long; the limit is {MAX_PARAMS_CHARS}")
    try:
        params = json.loads(text)
    except RecursionError:
        raise HTTPException(status_code=400, detail="params is nested too deeply to be a request's parameters") from None
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=f"params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise HTTPException(status_code=400, detail=f"params must be a JSON object, got {type(params).__name__}")
    for key in _FORBIDDEN_PARAMS:
        if key in params:
            raise HTTPException(
                status_code=400, detail=f"params may not set {key!r}: name the image with ?image=ID or upload it as a file"
            )
    device = params.get("device")
    if device is not None and not (isinstance(device, str) and _DEVICE.match(device)):
        raise HTTPException(status_code=400, detail=f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if "label_tag" in params:
        _to_http(check_tag, params["label_tag"])
    return params


def _to_http(check, *args):
    try:
        return check(*args)
    except DatastoreRequestError as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None


def _client_name(upload: UploadFile) -> str:
    """The upload's file name as the client gave it (its last part): what messages call the file."""
    return os.path.basename((upload.filename or "").replace("\\", "/"))[:255]


def _upload_suffix(upload: UploadFile, what: str) -> str:
    name = _client_name(upload)
    suffix = suffix_of(name)
    if suffix is None:
        raise HTTPException(status_code=400, detail=f"the {what} file {name!r} is not one of {', '.join(UPLOAD_SUFFIXES)}")
    return suffix


def _save_upload(upload: UploadFile, folder: str, what: str, suffix: str | None = None) -> str:
    """Copy the upload into ``folder`` as ``<what><suffix>`` (default: its own, which must be one of
    :data:`UPLOAD_SUFFIXES`); 400 for an empty file, 507/503 when the disk refuses it."""
    path = os.path.join(folder, f"{what}{suffix if suffix is not None else _upload_suffix(upload, what)}")
    try:
        with open(path, "wb") as f:
            while chunk := upload.file.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        problem = storage_problem(exc, f"the uploaded {what} {_client_name(upload)!r}", "nothing was stored")
        if problem is None:
            raise
        raise HTTPException(status_code=problem[0], detail=problem[1]) from None
    if os.path.getsize(path) == 0:
        raise HTTPException(status_code=400, detail=f"the {what} file is empty")
    return path


class RequestGuard:
    """ASGI middleware: refuse bad ids and tags in ``/datastore`` and ``/infer`` queries before routing."""

    def __init__(self, app, datastore: CheckedDatastore, api_prefix: str = "") -> None:
        self.app = app
        self.datastore = datastore
        self.prefix = api_prefix.rstrip("/")

    def problem(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, str] | None:
        path = path[len(self.prefix) :] if self.prefix and path.startswith(self.prefix) else path
        if not (path.startswith("/datastore") or path.startswith("/infer")):
            return None
        adding_image = method == "PUT" and path.rstrip("/") in ("/datastore", "/datastore/image")
        checks = [(check_tag, tag) for tag in query.get("tag", []) if tag]
        for key in ("image", "label", "id"):
            for value in query.get(key, []):
                if adding_image:
                    if value:
                        checks.append((check_new_image_id, value))
                elif value or path.startswith("/datastore"):
                    checks.append((self.datastore.image_uri_or_404, value))
        try:
            for check, value in checks:
                check(value)
        except DatastoreRequestError as exc:
            return exc.status, str(exc)
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            problem = self.problem(scope["method"], scope["path"], query)
            if problem:
                await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _infer_route(instance, upload_root: str):
    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: str | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        request = parse_params(params)
        if label is not None:
            raise HTTPException(status_code=400, detail="this model takes no label input: send a box prompt in params")
        if output not in (None, "image", "json", "all"):
            raise HTTPException(status_code=400, detail=f"output must be 'image', 'json' or 'all', got {output!r}")
        datastore = instance.datastore()
        with tempfile.TemporaryDirectory(dir=upload_root) as folder:
            if file is not None:
                path = _save_upload(file, folder, "image")
            elif session_id:
                if not PLAIN_NAME.match(session_id) or not (session := instance.sessions().get_session(session_id)):
                    raise HTTPException(status_code=404, detail=f"session {session_id!r} not found")
                path = session.image
            elif image:
                _to_http(datastore.image_uri_or_404, image)
                path = image  # an id: MONAI Label resolves it, and saves a label for it when asked to
            else:
                raise HTTPException(status_code=400, detail="no image: name one with ?image=ID or upload it as a file")
            request = {**instance.info().get("config", {}).get("infer", {}), **request, "model": model, "image": path}
            try:
                result = await run_in_threadpool(instance.infer, request)
            except HTTPException as exc:
                if file is not None:  # an answer names an upload by the client's file name, never by its server path
                    for server_path in {path, os.path.realpath(path)}:
                        exc.detail = str(exc.detail).replace(server_path, _client_name(file))
                raise
        return send_response(datastore, result, output, background_tasks)

    return infer


def _train_route(instance):
    async def train(
        model: str,
        params: dict | None = None,
        run_sync: bool = False,
        enqueue: bool = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        from monailabel.endpoints.train import run_model

        trainer = instance._trainers.get(model)
        if trainer is None:
            raise HTTPException(status_code=404, detail=f"unknown trainer {model!r}; this app trains {sorted(instance._trainers)}")
        if hasattr(trainer, "settings"):
            try:  # checked before a run is queued: a bad field is a 400 naming it, not a failed job or a 500
                trainer.settings(params or {})
            except ValueError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
        return await run_in_threadpool(run_model, model, params, run_sync, enqueue)

    return train


def _save_label_route(instance, upload_root: str, binary: bool = False):
    """``PUT /datastore/label``; with ``binary``, a ``.bin`` label too (MONAI Label's DICOMweb datastore converts one)."""

    async def save_label(
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        info = parse_params(params)
        # CheckedDatastore or lib.server.dicomweb.CheckedDICOMWebDatastore: its save_label checks the tag and image
        datastore = instance.datastore()
        with tempfile.TemporaryDirectory(dir=upload_root) as folder:
            suffix = ".bin" if binary and _client_name(label).lower().endswith(".bin") else None
            path = _save_upload(label, folder, "label", suffix)
            save = datastore.save_label  # the label and its record together, or neither (507/503 on a full disk)
            label_id = await run_in_threadpool(_to_http, save, image, path, tag or "final", info, _client_name(label))
        answer = instance.on_save_label(image, label_id) or {}
        return {**answer, "image": image, "label": label_id}

    return save_label


def _add_image_route(instance, upload_root: str):
    async def add_image(
        image: str | None = None,
        labels: str | None = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        info = parse_params(params)
        if labels is not None and labels not in LABEL_POLICIES:
            raise HTTPException(status_code=400, detail=f"labels must be one of {', '.join(LABEL_POLICIES)}, got {labels!r}")
        if user and getattr(user, "username", None):
            info["user"] = user.username
        name = _client_name(file)
        datastore: CheckedDatastore = instance.datastore()  # its add_image checks the file and the labels it replaces
        with tempfile.TemporaryDirectory(dir=upload_root) as folder:
            path = _save_upload(file, folder, "image")
            add = datastore.add_image
            image_id = await run_in_threadpool(_to_http, add, image or "", path, info, labels, name)
        return {"image": image_id}

    return add_image


def _update_model_route(instance, upload_root: str):
    async def update_model(
        model: str,
        file: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ):
        if model not in instance._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; this app serves {sorted(instance._infers)}")
        with tempfile.TemporaryDirectory(dir=upload_root) as folder:
            path = _save_upload(file, folder, "checkpoint", ".pt")
            return await run_in_threadpool(_to_http, instance.replace_model, model, path, _client_name(file) or "checkpoint")

    return update_model


async def _disk_error(request, exc: OSError):
    """A write the disk refused, anywhere in the server: 507 (full) or 503, naming the file but not its folder."""
    problem = storage_problem(exc, outcome="the request did not complete")
    if problem is None:
        raise exc
    logger.error("%s %s: %s (%s)", request.method, request.url.path, problem[1], exc)
    return JSONResponse({"detail": problem[1]}, status_code=problem[0])


#: MONAI Label 0.8.5's routes whose ``async`` endpoints call blocking functions directly, on the event loop: its
#: endpoint module, the method and the path (under the API prefix). With a DICOMweb store, an image or label
#: request may also fetch a series from the store.
BLOCKING_ROUTES = (
    ("train", "POST", "/train/"),  # every trainer; with run_sync, the whole training
    ("train", "POST", "/train/{model}"),
    ("scoring", "POST", "/scoring/"),  # every scoring method; with run_sync, UGS over every image
    ("scoring", "POST", "/scoring/{method}"),
    ("activelearning", "POST", "/activelearning/{strategy}"),
    ("batch_infer", "POST", "/batch/infer/{model}"),
    ("infer", "POST", "/infer/{model}"),
    ("wsi_infer", "POST", "/infer/wsi/{model}"),
    ("wsi_infer", "POST", "/infer/wsi_v2/{model}"),
    ("datastore", "GET", "/datastore/dataset"),  # builds a zip of the whole datastore
    ("datastore", "PUT", "/datastore/image"),
    ("datastore", "PUT", "/datastore/"),
    ("datastore", "GET", "/datastore/image"),
    ("datastore", "HEAD", "/datastore/image"),
    ("datastore", "DELETE", "/datastore/image"),
    ("datastore", "DELETE", "/datastore/"),
    ("datastore", "PUT", "/datastore/label"),
    ("datastore", "GET", "/datastore/label"),
    ("datastore", "HEAD", "/datastore/label"),
    ("datastore", "DELETE", "/datastore/label"),
    ("session", "PUT", "/session/"),  # copies the image
    ("model", "GET", "/model/info/{model}"),  # checksums the model file
)


def _complete(endpoint, args, kwargs):
    """Run the coroutine function ``endpoint`` to its end on an event loop of this (worker) thread."""
    return asyncio.run(endpoint(*args, **kwargs))


def _off_loop(endpoint):
    """``endpoint`` (an ``async`` endpoint that never awaits, calling blocking functions) run in a worker thread;
    the same signature, so FastAPI gives it the same parameters and dependencies."""

    async def off_loop(*args, **kwargs):
        return await run_in_threadpool(_complete, endpoint, args, kwargs)

    off_loop.__signature__ = inspect.signature(endpoint)
    off_loop.__name__ = off_loop.__qualname__ = f"{endpoint.__name__}_off_loop"
    off_loop.__doc__ = endpoint.__doc__
    return off_loop


def install_off_loop(server) -> None:
    """Whatever the datastore: put each of MONAI Label's :data:`BLOCKING_ROUTES`, its endpoint run in a worker
    thread, ahead of MONAI Label's own. Call it before the routes that replace some of them (:func:`install`),
    so that those stay first. The copies are left out of the OpenAPI schema, which keeps MONAI Label's."""
    from importlib import import_module

    prefix = settings.MONAI_LABEL_API_STR
    routes = []
    for module_name, method, path in BLOCKING_ROUTES:
        router = import_module(f"monailabel.endpoints.{module_name}").router
        (original,) = [r for r in router.routes if isinstance(r, APIRoute) and r.path == path and method in r.methods]
        routes.append(
            APIRoute(
                f"{prefix}{path}",
                _off_loop(original.endpoint),
                methods=[method],
                name=f"imedsam_off_loop_{original.name}",
                dependencies=original.dependencies,
                response_class=original.response_class,
                include_in_schema=False,
            )
        )
    server.router.routes[:0] = routes
    logger.info("MONAI Label's %d routes that block (run_sync training and scoring, active learning, the dataset zip, "
                "infers, image and label transfers) run in a worker thread", len(routes))  # fmt: skip


def install_model_upload(server, instance, upload_root: str) -> None:
    """Whatever the datastore (local or DICOMweb): the checked ``PUT /model/{model}`` ahead of MONAI Label's,
    and disk errors answered with 507/503. The caller builds the middleware stack again afterwards."""
    pathlib.Path(upload_root).mkdir(parents=True, exist_ok=True)
    prefix = settings.MONAI_LABEL_API_STR
    route = APIRoute(f"{prefix}/model/{{model}}", _update_model_route(instance, upload_root), methods=["PUT"], name="imedsam_update_model")
    server.router.routes.insert(0, route)
    server.add_exception_handler(OSError, _disk_error)


def install_label_save(server, instance, upload_root: str) -> None:
    """For a DICOMweb store: the app's ``PUT /datastore/label`` ahead of MONAI Label's, so that the upload is kept in
    a per-request folder and the datastore's refusals (:class:`DatastoreRequestError`, a full disk) are answered
    with their status (:func:`install` adds it for a local datastore)."""
    pathlib.Path(upload_root).mkdir(parents=True, exist_ok=True)
    route = _save_label_route(instance, upload_root, binary=True)
    path = f"{settings.MONAI_LABEL_API_STR}/datastore/label"
    server.router.routes.insert(0, APIRoute(path, route, methods=["PUT"], name="imedsam_save_label"))


def install(server, instance, upload_root: str) -> None:
    """Put :class:`RequestGuard` in front of ``server`` (the FastAPI app of ``monailabel start_server``,
    already running) and its own infer, image, label, model and training routes ahead of MONAI Label's, and
    MONAI Label's other blocking routes off the event loop (:func:`install_off_loop`)."""
    install_off_loop(server)
    install_model_upload(server, instance, upload_root)
    prefix = settings.MONAI_LABEL_API_STR
    routes = [
        APIRoute(f"{prefix}/infer/{{model}}", _infer_route(instance, upload_root), methods=["POST"], name="imedsam_infer"),
        APIRoute(f"{prefix}/datastore/label", _save_label_route(instance, upload_root), methods=["PUT"], name="imedsam_save_label"),
        APIRoute(f"{prefix}/datastore/image", _add_image_route(instance, upload_root), methods=["PUT"], name="imedsam_add_image"),
        APIRoute(f"{prefix}/datastore/", _add_image_route(instance, upload_root), methods=["PUT"], name="imedsam_add_image_v1"),
        APIRoute(f"{prefix}/train/{{model}}", _train_route(instance), methods=["POST"], name="imedsam_train"),
    ]
    server.router.routes[:0] = routes
    # Starlette builds its middleware stack, which holds the exception handlers, on the first request (the
    # startup one), after which add_middleware is refused: build it again and wrap it.
    server.middleware_stack = RequestGuard(server.build_middleware_stack(), instance.datastore(), prefix)
    logger.info(
        "request guard installed: ids, tags and params are checked; images, labels and checkpoints are checked before "
        "they are stored; infers and saves run off the event loop; a full disk is answered with 507"
    )
