"""The web service and its page: one trained run, loaded once, answering uploads.

Routes
    GET  /              the single page (pick or drop an X-ray, see probability and heat map)
    POST /api/predict   multipart field ``file`` -> probability, label, threshold, Grad-CAM
    GET  /api/health    {"status": "ok", "model": ...} (also at /health)
    GET  /api/model     the run's model.json (paths on the server reduced to file names)

Every error is JSON ``{"error": "..."}``. A problem with the uploaded file reads
``"<file name>: <reason>"``, the reason worded as the decoder words it for ``predict``; when the
body is refused before it is parsed, the name is not known yet and reads ``upload``. A problem
with the request itself (not multipart, malformed, no ``file`` field) is a sentence naming it.
    413  the upload exceeds MAX_UPLOAD_BYTES (``file too large: ...``), or the image's header
         declares more than MAX_PIXELS pixels (``image too large: ...``, before any pixel is
         decoded)
    415  the request is not a multipart/form-data upload, or the file's content is not an image
         format the decoder knows nor DICOM (``not an image (...)``)
    422  no ``file`` field, a malformed or incomplete body, an empty file (no content, so no
         type at all), or an image that cannot be decoded (truncated, corrupt, unsupported DICOM)
    500  the server lacks what the file needs (pydicom, a DICOM codec: the reason says what to
         install), the decoder failed in a way it should not (``internal decoder error``), or
         the model's probability is not finite (NaN or infinity: a broken model, never a label)
    503  the server had not enough memory to decode the image: a retry may succeed

The server reads only the uploaded bytes, never a file a client names. Inference runs in
FastAPI's thread pool under one lock: the model is shared, and Grad-CAM hooks it while it runs.
"""

import base64
import functools
import importlib.util
import io
import logging
import math
import re
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import CLASS_NAMES, __version__
from pneumoscan.data import decode, medmnist
from pneumoscan.errors import PneumoscanError, UnreadableImage
from pneumoscan.predict import NOT_FINITE, label_for

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = decode.MAX_PIXELS  # the decoder enforces it from the header
ENVELOPE_BYTES = 64 * 1024  # multipart boundaries and part headers around the file itself
DISPLAY_SIZE = 320  # longest side of the gray image and overlay the page shows
MAX_FILENAME = 255
UNNAMED = "upload"  # the file name in errors when the client gave none, or it is not known yet
DECODE_SLOTS = 4  # images decoded at once: bounds memory when many large uploads arrive together


class ApiError(Exception):
    """An answer other than 200, carried out of the request handling to one JSON handler."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(run_dir: str | Path, device: str = "cpu", max_upload_bytes: int | None = None):
    """A FastAPI app serving the run in ``run_dir``; the model is loaded here, once.
    ``max_upload_bytes``: the largest upload taken (default MAX_UPLOAD_BYTES)."""
    fastapi = _require_fastapi()
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pneumoscan.model_io import input_sizes, load_predictor

    _quiet_multipart_log()
    predictor = load_predictor(run_dir, device)
    model_info = public_meta(predictor.meta)
    if len(sizes := input_sizes(predictor)) > 1:  # a stack's members, each at its own size
        model_info["input_sizes"] = list(sizes)
    page = resources.files("pneumoscan.serve").joinpath("page.html").read_text("utf-8")
    service = _Service(predictor)

    app = fastapi.FastAPI(
        title="pneumoscan",
        version=__version__,
        description="Pneumonia on pediatric chest X-rays. Research use only: not a medical device.",
        # FastAPI's /docs and /redoc pages load their scripts from the internet: blank offline.
        # The schema itself stays at /openapi.json.
        docs_url=None, redoc_url=None,
    )

    app.state.predictions_in_progress = 0
    app.state.max_upload_bytes = max_upload_bytes

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        headers = exc.headers
        if exc.status_code == 405:  # Allow: every method the path takes, over all its routes
            headers = {"Allow": ", ".join(_allowed_methods(app, request.scope))}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        # Still JSON for the page; the traceback goes to the server's log, not to the client.
        return JSONResponse({"error": "internal server error"}, status_code=500)

    # These answer on the event loop itself (async, nothing to wait for): run in the thread
    # pool, they queued behind the predictions waiting there for the model, and a health probe
    # or the page's first request took seconds under load.
    # HEAD as well as GET: uptime monitors and curl -I ask with it (left out of the schema,
    # where it would repeat each GET).
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.head("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/health")
    @app.head("/api/health", include_in_schema=False)
    @app.get("/health", include_in_schema=False)
    @app.head("/health", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok", "model": predictor.name}

    @app.get("/api/model")
    @app.head("/api/model", include_in_schema=False)
    async def model() -> dict:
        return model_info

    prediction, error = _answer_models()

    @app.post("/api/predict", openapi_extra=_UPLOAD_SCHEMA, response_model=prediction,
              responses={status: {"model": error, "description": why}
                         for status, why in ERROR_STATUSES.items()})
    async def predict(request: Request) -> dict:
        # The body is read here, not by FastAPI's form handling, so that an oversized upload
        # is refused while streaming instead of after it has been spooled to disk.
        data, filename = await _read_upload(request,
                                            app.state.max_upload_bytes or MAX_UPLOAD_BYTES)
        app.state.predictions_in_progress += 1  # for serve's Ctrl-C line (on the event loop)
        try:
            return await run_in_threadpool(service.predict, data, filename)
        finally:
            app.state.predictions_in_progress -= 1

    return app


def _allowed_methods(app, scope) -> list[str]:
    """The methods the routes of ``scope``'s path take. (Starlette's own 405 names one route's
    alone, and HEAD has routes of its own here, kept out of the schema.)"""
    from starlette.routing import Match

    methods = set()
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _require_fastapi():
    try:
        import fastapi
        import multipart  # noqa: F401  (python-multipart: FastAPI's form parser)
    except ImportError as e:
        raise PneumoscanError(
            f"serve needs fastapi, uvicorn and python-multipart ({e.name} is missing): "
            "pip install 'pneumoscan[serve]'"
        ) from None
    return fastapi


def _quiet_multipart_log() -> None:
    """Keep python-multipart's parse warnings off the server's stderr.

    The parser logs a warning ("Expected boundary character ...") and then raises the same
    message, which the client receives in its 422; with no logging configured, Python's
    last-resort handler would print it on stderr as well. Its ERROR records (a temporary file that
    cannot be created) are the server's own problems and still get through.
    """
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


# The answers other than 200 that /api/predict gives, as its schema lists them.
ERROR_STATUSES = {
    413: "upload over the limit, or an image header declaring too many pixels",
    415: "not a multipart/form-data upload, or content that is no image",
    422: "no 'file' field, a malformed or incomplete body, an empty or undecodable image",
    500: "the server lacks a decoder the file needs, or the model's probability is not finite",
    503: "not enough memory to decode the image: a retry may succeed",
}


def _answer_models():
    """The JSON answers of /api/predict as pydantic models, for /openapi.json."""
    from pydantic import BaseModel, Field

    class Prediction(BaseModel):
        probability: float = Field(description=f"calibrated probability of {CLASS_NAMES[1]}")
        label: str = Field(description=f"{CLASS_NAMES[1]} when probability >= threshold, "
                                       f"else {CLASS_NAMES[0]}")
        threshold: float = Field(description="the run's threshold, chosen on validation data")
        model: str = Field(description="the model's name")
        filename: str = Field(description="the uploaded file's name")
        image_png: str = Field(description="the image as the page shows it: a base64 PNG")
        gradcam_png: str | None = Field(description="the Grad-CAM heat map over it (base64 "
                                                    "PNG), or null without Grad-CAM")

    class Error(BaseModel):
        error: str = Field(description="'<file name>: <reason>', or a sentence naming what is "
                                       "wrong with the request")

    return Prediction, Error


def public_meta(meta: dict) -> dict:
    """model.json as clients may see it: local paths on the server are reduced to names."""
    info = dict(meta)
    if isinstance(info.get("data_source"), str):
        info["data_source"] = medmnist.public_description(info["data_source"])
    if isinstance(info.get("onnx"), dict) and "file" in info["onnx"]:
        info["onnx"] = {**info["onnx"], "file": Path(str(info["onnx"]["file"])).name}
    return info


# --- reading the upload --------------------------------------------------------------------


async def _read_upload(request, max_bytes: int) -> tuple[bytes, str]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    _check_content_type(request.headers.get("content-type", ""))
    limit = max_bytes + ENVELOPE_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(UNNAMED, max_bytes)
    body = _Limited(request.stream(), limit, max_bytes, request.headers.get("content-type", ""))
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=4)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise ApiError(422, "one image per request: this body holds more than one "
                                "file") from None
        raise ApiError(422, f"malformed multipart body ({_parse_reason(e)})") from None
    except ClientDisconnect:
        # Nobody reads this answer; handling it here keeps a dropped upload out of the
        # catch-all 500 handler, which logs a full traceback for every such client.
        raise ApiError(422, "incomplete body: the client disconnected") from None
    try:
        upload = form.get("file")
        if isinstance(upload, str):  # a part without a filename is a text field, not a file
            raise ApiError(422, "the field 'file' came as text, without a filename: send the "
                                "image as a file upload (curl -F 'file=@IMAGE')")
        if not isinstance(upload, UploadFile):
            if not body.closed:
                # The parser drops a part its body ends inside of, without a word.
                raise ApiError(422, "incomplete multipart body: it ends before its closing "
                                    "boundary")
            raise ApiError(422, "missing file: send the image in a multipart field named 'file'")
        data = await upload.read(max_bytes + 1)
        filename = (upload.filename or UNNAMED)[:MAX_FILENAME]
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise _too_large(filename, max_bytes)
    return data, filename


def _check_content_type(content_type: str) -> None:
    """415 for a body that is not a form upload (a raw image, JSON): the wrong media type."""
    if content_type.lower().startswith("multipart/form-data"):
        return
    # Cut short: the header is the client's, and the answer should stay one short line.
    got = content_type[:80] or "none"
    raise ApiError(415, "send the image as a multipart/form-data upload in a field named "
                        f"'file' (this request's Content-Type: {got})")


def _parse_reason(e) -> str:
    # Starlette says only "Invalid multipart data."; python-multipart's own message, kept as the
    # cause, says where the body went wrong (and it is not logged: _quiet_multipart_log).
    return str(e.__cause__ or e.message)


class _Limited:
    """The request body, refusing it (413) as soon as more than ``limit`` bytes have arrived,
    and noting whether it holds the closing delimiter of ``content_type``'s boundary
    (``--BOUNDARY--``), as every whole multipart body does: a body cut short loses its last
    part without a word from the parser."""

    def __init__(self, stream: AsyncIterator[bytes], limit: int, max_bytes: int,
                 content_type: str):
        self._stream, self._limit, self._max_bytes = stream, limit, max_bytes
        match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
        self._closing = f"--{match[1]}--".encode("latin-1", "replace") if match else b""
        self.closed = not self._closing

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received, carry = 0, b""
        async for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                # Before parsing: the part's file name is not known.
                raise _too_large(UNNAMED, self._max_bytes)
            if not self.closed:  # the delimiter may straddle two chunks
                window = carry + chunk
                self.closed = self._closing in window
                carry = window[-len(self._closing):]
            yield chunk


def _too_large(filename: str, max_bytes: int) -> ApiError:
    # Worded like the decoder's "file too large" so that serve and predict give one reason;
    # the server's keeper can raise the limit, and whoever sent it can tell them how.
    return ApiError(413, f"{filename}: file too large: the upload limit is {max_bytes:,} "
                         "bytes (serve --max-upload-mb raises it)")


# --- inference -----------------------------------------------------------------------------


class _Service:
    """The loaded predictor, its Grad-CAM if available, and the lock that serialises them."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.lock = threading.Lock()
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        # Grad-CAM needs captum, an optional dependency, and a model whose layer gives a map
        # (not a ViT's tokens): without them predictions still work, and answers carry
        # "gradcam_png": null.
        self.explain = None
        if importlib.util.find_spec("captum") is not None:
            from pneumoscan import explain

            log = logging.getLogger("pneumoscan.serve")
            problem = explain.gradcam_problem(predictor)
            if problem:
                log.warning("warning: %s: answers carry no heat map", problem)
            else:
                self.explain = explain
                if coarse := explain.grid_warning(predictor):  # a map of one colour: say so
                    log.warning("warning: %s", coarse)

    def _gradcam(self, image: np.ndarray) -> np.ndarray | None:
        if self.explain is None:
            return None
        return self.explain.gradcam(self.predictor, image[None])[0]

    def predict(self, data: bytes, filename: str) -> dict[str, Any]:
        from pneumoscan.model_io import at_size, read_inputs, stack_inputs

        size = self.predictor.image_size
        with self.decode_slots:
            # The model's input comes from the same decode as `predict` and training use. The
            # page shows the image in its own aspect ratio, as `explain` draws it (the model's
            # input is squashed to a square), its longest side at least DISPLAY_SIZE.
            inputs = _decode(functools.partial(read_inputs, self.predictor), data, filename)
            display = _decode(decode.read_gray, data, filename, size=max(size, DISPLAY_SIZE),
                              keep_aspect=True)
        image = at_size(inputs, size)  # Grad-CAM's, at the predictor's size
        with self.lock:
            probability = float(self.predictor.predict_proba(stack_inputs([inputs]))[0])
            if not math.isfinite(probability):
                # NaN is never above the threshold: it would be answered as NORMAL.
                raise ApiError(500, f"{filename}: {NOT_FINITE}")
            cam = self._gradcam(image)
        threshold = float(self.predictor.threshold)
        return {
            "probability": probability,
            "label": label_for(probability, threshold),
            "threshold": threshold,
            "model": self.predictor.name,
            "filename": filename,
            "gradcam_png": _overlay_b64(self.explain, display, cam),
            "image_png": base64.b64encode(_gray_png(display)).decode("ascii"),
        }


def _decode(read, data: bytes, filename: str, **options) -> np.ndarray:
    """``read(data, name=filename, **options)``, a decoding failure answered with its status."""
    try:
        return read(data, name=filename, **options)
    except UnreadableImage as e:
        # The decoder's reason as it is, so that serve and predict name a file's problem alike.
        raise ApiError(_status(e.reason), f"{filename}: {e.reason}") from None


def _status(reason: str) -> int:
    """The HTTP status for a decoder's reason."""
    if reason.startswith(("image too large", "file too large")):
        return 413  # a header-declared size beyond MAX_PIXELS, like an oversized upload
    if reason.startswith("not an image"):
        return 415  # content of a type the service does not take
    if reason.startswith((decode.INTERNAL_ERROR, "pydicom is not installed")) or (
            reason.startswith("cannot decode DICOM transfer syntax") and "install " in reason):
        return 500  # the server's fault or its set-up's, not the file's
    if reason.startswith("not enough memory"):
        return 503
    return 422  # an empty file (no type at all), or an image that cannot be decoded


def _overlay_b64(explain, display: np.ndarray, cam: np.ndarray | None) -> str | None:
    if explain is None or cam is None:
        return None
    # The map is computed at the model's input size; overlay_png stretches it to the image.
    return base64.b64encode(explain.overlay_png(display, cam)).decode("ascii")


def _gray_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
