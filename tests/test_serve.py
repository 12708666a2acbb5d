"""The web service through FastAPI's TestClient, and its page in headless Chromium.

The trained run is conftest's session fixture ``trained_run`` (seed_cnn, 32 px, synthetic data).
"""

import asyncio
import base64
import contextlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from pneumoscan.cli import main  # noqa: E402
from pneumoscan.data.decode import read_gray  # noqa: E402
from pneumoscan.model_io import load_predictor, read_meta, save_meta  # noqa: E402
from pneumoscan.serve import app as app_module  # noqa: E402
from pneumoscan.serve.app import create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def client(trained_run):
    with TestClient(create_app(trained_run)) as c:
        yield c


@pytest.fixture(scope="module")
def image_file(synthetic_data) -> Path:
    return sorted((synthetic_data / "test" / "PNEUMONIA").glob("*.png"))[0]


def _post(client, data: bytes, name: str = "x.png", field: str = "file", **kwargs):
    return client.post("/api/predict", files={field: (name, data, "application/octet-stream")},
                       **kwargs)


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring a huge image, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(body, zlib.crc32(kind))
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_health_and_model(client, trained_run):
    health = client.get("/api/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": "seed_cnn"}
    info = client.get("/api/model").json()
    meta = read_meta(trained_run)
    assert info["threshold"] == meta["threshold"] and info["image_size"] == 32
    assert set(info["validation"]) >= {"sensitivity", "specificity", "roc_auc"}
    assert "/" not in info.get("data_source", "")  # no server paths handed out


def test_nothing_served_loads_from_the_internet(client):
    # FastAPI's /docs and /redoc pull their scripts from a CDN: blank pages offline.
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]
    assert "http" not in client.get("/").text.replace("http-equiv", "")


def test_predict_a_png(client, trained_run, image_file):
    response = _post(client, image_file.read_bytes(), name=image_file.name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"probability", "label", "threshold", "model", "filename", "gradcam_png"}
    assert 0.0 <= body["probability"] <= 1.0
    predictor = load_predictor(trained_run)
    expected = predictor.predict_proba(read_gray(image_file, predictor.image_size)[None])[0]
    assert body["probability"] == pytest.approx(expected, abs=1e-6)  # the same as the CLI's
    assert body["threshold"] == pytest.approx(predictor.threshold)
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= body["threshold"] else "NORMAL")
    assert body["filename"] == image_file.name and body["model"] == "seed_cnn"
    if body["gradcam_png"] is None:
        pytest.importorskip("captum", reason="Grad-CAM needs captum")
        pytest.fail("gradcam_png is null although captum is installed")
    overlay = Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"], validate=True)))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    shown = Image.open(io.BytesIO(base64.b64decode(body["image_png"], validate=True)))
    assert shown.size == overlay.size


def test_the_page_is_shown_the_image_in_its_own_aspect_ratio(client, tmp_path):
    # The model's input is squashed to a square; what a clinician looks at must not be.
    wide = np.zeros((140, 224), dtype=np.uint8)
    wide[40:100, 60:160] = 200
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    body = _post(client, buffer.getvalue(), name="wide.png").json()
    shown = Image.open(io.BytesIO(base64.b64decode(body["image_png"])))
    assert shown.size == (app_module.DISPLAY_SIZE, 200)  # 224 x 140 with its longest side 320
    if body["gradcam_png"] is not None:
        assert Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"]))).size == shown.size


def test_the_upload_limit_is_the_servers_to_set(trained_run, image_file, capsys):
    """A 30 MB DR DICOM, which predict reads, could not be served at all."""
    data = image_file.read_bytes()
    with TestClient(create_app(trained_run, max_upload_bytes=len(data) - 1)) as c:
        assert _post(c, data).status_code == 413
    with TestClient(create_app(trained_run, max_upload_bytes=len(data))) as c:
        assert _post(c, data).status_code == 200
    assert main(["serve", str(trained_run), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb 0: expected more than 0" in capsys.readouterr().err


def test_oversize_upload_413(client, image_file, monkeypatch):
    data = image_file.read_bytes()
    limit = len(data) - 1
    reason = (f"file too large: the upload limit is {limit:,} bytes (serve --max-upload-mb "
              "raises it)")
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", limit)
    response = _post(client, data, name="big.png")  # under the envelope allowance: parsed
    assert response.status_code == 413  # so the file is named, like every other file error
    assert response.json()["error"] == f"big.png: {reason}"
    big = b"\x89PNG" + bytes(app_module.ENVELOPE_BYTES + len(data))
    response = _post(client, big, name="big.png")  # refused from Content-Length, unparsed
    assert response.status_code == 413  # the name is not known yet: "upload", as documented
    assert response.json()["error"] == f"upload: {reason}"

    def chunks():  # no Content-Length at all: refused while streaming
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n"
        for _ in range(20):
            yield bytes(app_module.ENVELOPE_BYTES)

    response = client.post("/api/predict", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert response.json()["error"].startswith("upload: file too large: ")


def test_pixel_bomb_refused_413(client):
    response = _post(client, _png_declaring(20_000, 20_000))
    assert response.status_code == 413
    assert "image too large" in response.json()["error"]


def test_text_file_415(client):
    response = _post(client, b"name,value\nfoo,1\n", name="table.csv")
    assert response.status_code == 415
    # The decoder's reason, word for word as `predict` gives it.
    assert response.json()["error"] == "table.csv: not an image (content is text/HTML)"


def test_truncated_image_422(client, image_file):
    response = _post(client, image_file.read_bytes()[:150], name="cut.png")
    assert response.status_code == 422
    assert response.json()["error"] == "cut.png: truncated PNG"


@pytest.mark.parametrize("reason, status", [
    ("pydicom is not installed: pip install pydicom", 500),
    ("cannot decode DICOM transfer syntax JPEG 2000 (install pylibjpeg-openjpeg or gdcm)", 500),
    ("cannot decode DICOM transfer syntax JPEG 2000 (corrupt or unsupported compressed data)",
     422),
    ("internal decoder error (IndexError: boom)", 500),
    ("not enough memory to decode the image", 503),
    ("corrupt or unsupported compressed data", 422),
])
def test_a_problem_of_the_server_is_not_blamed_on_the_file(client, image_file, monkeypatch,
                                                           reason, status):
    from pneumoscan.data import decode
    from pneumoscan.errors import UnreadableImage

    def refuse(source, size=None, *, name=None):
        raise UnreadableImage(name, reason)

    monkeypatch.setattr(decode, "read_gray", refuse)
    response = _post(client, image_file.read_bytes(), name="x.dcm")
    assert response.status_code == status
    assert response.json()["error"] == f"x.dcm: {reason}"


def test_missing_field_422(client, image_file):
    response = _post(client, image_file.read_bytes(), field="image")
    assert response.status_code == 422 and "'file'" in response.json()["error"]
    response = client.post("/api/predict", json={"file": "/etc/passwd"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    assert client.get("/api/nothing").json() == {"error": "Not Found"}


def test_concurrent_requests_share_the_model(client, image_file):
    data = image_file.read_bytes()
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _post(client, data), range(12)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["probability"] for r in responses}) == 1


def test_ensemble_run(trained_run, tmp_path, image_file):
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    for name in ("m0", "m1"):
        shutil.copytree(trained_run, ensemble / name)
    meta = read_meta(trained_run)
    save_meta(ensemble, {"kind": "ensemble", "members": ["m0", "m1"],
                         "class_names": meta["class_names"], "image_size": meta["image_size"],
                         "threshold": meta["threshold"], "temperature": 1.0})
    with TestClient(create_app(ensemble)) as c:
        assert c.get("/api/health").json()["model"] == "ensemble of 2"
        response = _post(c, image_file.read_bytes())
    assert response.status_code == 200 and 0 <= response.json()["probability"] <= 1


def test_a_stack_of_several_sizes_shows_each(tmp_path, monkeypatch):
    """The page showed 'input 64 px' for a stack whose other member takes 32 px images."""
    import torch

    import pneumoscan.model_io as model_io
    from pneumoscan.models import create_model

    def member(size: int):
        model = create_model("seed_cnn", in_chans=3, image_size=size).eval()
        meta = {"architecture": "seed_cnn", "image_size": size, "in_chans": 3,
                "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 1.0}
        return model_io.Predictor(tmp_path, meta, model, torch.device("cpu"))

    stack = model_io.EnsemblePredictor(tmp_path, {"kind": "ensemble", "image_size": 64,
                                                  "threshold": 0.5, "temperature": 1.0},
                                       [member(32), member(64)])
    monkeypatch.setattr(model_io, "load_predictor", lambda *_args: stack)
    with TestClient(create_app(tmp_path)) as c:
        assert c.get("/api/model").json()["input_sizes"] == [32, 64]
        assert "meta.input_sizes" in c.get("/").text  # the page shows them


# --- hostile requests ---------------------------------------------------------------------

BOUNDARY = "pneumoscanboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _part(data: bytes, *, field: str = "file", filename: str | None = "x.png",
          close: bool = True) -> bytes:
    """One multipart part by hand, so that it can be broken in ways httpx would not."""
    disposition = f'form-data; name="{field}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
    return head + data + (f"\r\n--{BOUNDARY}--\r\n" if close else "\r\n").encode()


def _post_raw(client, body, content_type: str = MULTIPART):
    return client.post("/api/predict", content=body, headers={"content-type": content_type})


def test_a_file_field_sent_without_a_filename_is_told_so(client, image_file):
    # curl -F 'file=<x.png' sends the bytes as a text field: "send a field named 'file'" was
    # what the client had done.
    response = _post_raw(client, _part(image_file.read_bytes(), filename=None))
    assert response.status_code == 422
    assert "without a filename" in response.json()["error"]


def _malformed(image: bytes) -> dict[str, tuple[bytes, str]]:
    whole = _part(image)
    return {
        "wrong boundary": (whole, "multipart/form-data; boundary=another"),
        "no boundary": (whole, "multipart/form-data"),
        "truncated body": (whole[:120], MULTIPART),
        "truncated part headers": (whole[:30], MULTIPART),
        "no closing boundary": (_part(image, close=False), MULTIPART),
        "garbage part headers": (f"--{BOUNDARY}\r\n\x01 not a header\r\n\r\n".encode() + image
                                 + f"\r\n--{BOUNDARY}--\r\n".encode(), MULTIPART),
        "no content-disposition": (f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\n".encode()
                                   + image + f"\r\n--{BOUNDARY}--\r\n".encode(), MULTIPART),
        "random bytes as multipart": (bytes(range(256)) * 8, MULTIPART),
        "empty body": (b"", MULTIPART),
        "two files": (_part(image, close=False) + _part(image, filename="y.png"), MULTIPART),
    }


MALFORMED = list(_malformed(b""))


def _json_error(response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error
    return error


def test_hand_made_multipart_is_accepted(client, image_file):
    # The control for the cases below: the same hand-built body, unbroken, is a valid upload.
    response = _post_raw(client, _part(image_file.read_bytes()))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_multipart_422(client, image_file, case):
    body, content_type = _malformed(image_file.read_bytes())[case]
    response = _post_raw(client, body, content_type)
    assert response.status_code == 422, response.text
    _json_error(response)


@pytest.mark.parametrize("case, said", [
    # The parser drops a part the body ends inside of: "missing file" blamed the client for a
    # field it had sent.
    ("no closing boundary", "incomplete multipart body: it ends before its closing boundary"),
    ("two files", "one image per request: this body holds more than one file"),
])
def test_a_cut_short_or_crowded_body_says_what_is_wrong(client, image_file, case, said):
    body, content_type = _malformed(image_file.read_bytes())[case]
    assert _json_error(_post_raw(client, body, content_type)) == said


def test_a_whole_body_with_a_long_epilogue_is_no_body_cut_short(client, image_file):
    body = _part(image_file.read_bytes(), field="upload") + b"x" * 5000  # epilogue
    assert _json_error(_post_raw(client, body)).startswith("missing file")


def test_wrong_methods_say_the_allowed_and_head_answers(client):
    """405 answers had no Allow header (RFC 9110 wants one), and monitors asking with HEAD got
    405 from every page."""
    response = client.post("/api/health")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}
    for path in ("/", "/api/health", "/api/model"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path


def test_the_schema_describes_answers_and_errors(client):
    operation = client.get("/openapi.json").json()["paths"]["/api/predict"]["post"]
    assert {"413", "415", "422", "500", "503"} <= set(operation["responses"])
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"probability", "label", "threshold", "gradcam_png"} <= set(
        schemas["Prediction"]["properties"])
    assert "multipart/form-data" in operation["requestBody"]["content"]


def test_the_page_asks_relative_to_where_it_is_served(client):
    """fetch("/api/model") left the page empty behind a proxy that mounts it at /pneumoscan/."""
    html = client.get("/").text
    assert re.findall(r'fetch\("([^"]+)"', html) == ["api/model", "api/predict"]


def test_a_network_wide_host_is_warned_about():
    from pneumoscan.commands import serve as serve_command

    assert all(serve_command._local_only(h) for h in ("127.0.0.1", "::1", "localhost"))
    assert not any(serve_command._local_only(h) for h in ("0.0.0.0", "::", "192.168.1.5"))
    warning = serve_command.network_warning("0.0.0.0", 8000)
    assert f"http://{socket.gethostname()}:8000/" in warning and "no login" in warning


def test_wrong_field_and_plain_field_422(client, image_file):
    data = image_file.read_bytes()
    response = _post_raw(client, _part(data, field="upload"))
    assert response.status_code == 422 and "'file'" in _json_error(response)
    # A field named "file" that is a plain form value, not a file: still no upload.
    response = _post_raw(client, _part(data, filename=None))
    assert response.status_code == 422 and "'file'" in _json_error(response)


def test_empty_upload_422(client):
    response = _post(client, b"", name="empty.png")
    assert response.status_code == 422
    assert _json_error(response) == "empty.png: empty file"


@pytest.mark.parametrize("data, reason", [
    (b"<!doctype html><html><body>hi</body></html>", "not an image (content is text/HTML)"),
    (b"\0" + bytes(range(255)) * 16, "not an image (unrecognised format)"),
], ids=["html", "random"])
def test_non_images_415(client, data, reason):
    response = _post(client, data, name="thing.jpeg")
    assert response.status_code == 415
    assert _json_error(response) == f"thing.jpeg: {reason}"


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream", None])
def test_body_not_a_form_upload_415(client, image_file, content_type):
    # curl --data-binary @x.jpeg: the image itself as the body, not a multipart form.
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/api/predict", content=image_file.read_bytes(), headers=headers)
    assert response.status_code == 415
    error = _json_error(response)
    assert "multipart/form-data" in error and "'file'" in error
    assert (content_type or "none") in error


def test_malformed_multipart_reason_without_a_log_line(client, image_file, caplog):
    # python-multipart logs its parse error as a warning, which would reach the server's
    # stderr; the reason belongs in the answer, once.
    body, content_type = _malformed(image_file.read_bytes())["wrong boundary"]
    with caplog.at_level(logging.DEBUG):
        response = _post_raw(client, body, content_type)
    assert response.status_code == 422
    assert _json_error(response).startswith("malformed multipart body (Expected boundary")
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]


def test_chunked_uploads_without_content_length(client, image_file, monkeypatch):
    body = _part(image_file.read_bytes())

    def pieces(data: bytes, size: int = 1000):
        yield from (data[i:i + size] for i in range(0, len(data), size))

    response = _post_raw(client, pieces(body))
    assert "content-length" not in response.request.headers  # it really went chunked
    assert response.status_code == 200, response.text

    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 4096)
    oversize = _part(bytes(4096 + app_module.ENVELOPE_BYTES + 1))  # no length to refuse from
    response = _post_raw(client, pieces(oversize, 8192))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "too large" in _json_error(response)


def test_client_hanging_up_mid_body(trained_run, image_file):
    # TestClient cannot drop a connection, so the ASGI app is driven directly: half the body,
    # then the disconnect message a server sends when the client goes away.
    app = create_app(trained_run)
    body = _part(image_file.read_bytes())
    incoming = [{"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/predict", "raw_path": b"",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", MULTIPART.encode()),
                         (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))  # before the fix: a 500 and ClientDisconnect raised
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 422


def test_still_serving_after_abuse(client, image_file):
    data = image_file.read_bytes()
    for body, content_type in _malformed(data).values():
        assert _post_raw(client, body, content_type).status_code == 422
    assert _post(client, b"").status_code == 422
    assert _post(client, _png_declaring(30_000, 30_000)).status_code == 413
    assert _post(client, data[: len(data) // 3]).status_code == 422
    assert _post(client, b"plain text").status_code == 415
    assert client.get("/api/health").status_code == 200
    response = _post(client, data)
    assert response.status_code == 200 and 0 <= response.json()["probability"] <= 1


def test_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert 'id="file"' in html and 'id="toggle-heatmap"' in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing external


# --- the page in a real browser -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(trained_run):
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(trained_run), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_chromium(live_server, image_file):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("captum", reason="the heat-map toggle needs Grad-CAM (captum)")
    problems: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(live_server + "/")
            page.wait_for_selector("#model-info dt")  # the model summary loaded
            # The synthetic files are named as Kermany's: each kind's validation sensitivity.
            info = page.inner_text("#model-info")
            assert re.search(r"viral \(val\., \d+\)\s+\d\.\d{3}", info), info
            assert page.is_disabled("#toggle-heatmap")
            page.set_input_files("#file", str(image_file))
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            text = page.inner_text("#probability")
            assert re.fullmatch(r"\d{1,3}\.\d%", text), text
            width = page.eval_on_selector("#bar-fill", "e => e.style.width")
            assert float(width.rstrip("%")) == pytest.approx(float(text.rstrip("%")), abs=0.06)
            assert page.inner_text("#label") in ("PNEUMONIA", "NORMAL")
            assert page.is_visible("#image") and not page.is_visible("#overlay")
            page.check("#toggle-heatmap")
            page.wait_for_selector("#overlay", state="visible")
            loaded = page.eval_on_selector("#overlay", "e => e.complete && e.naturalWidth > 0")
            assert loaded
            page.uncheck("#toggle-heatmap")
            assert not page.is_visible("#overlay")
        finally:
            browser.close()
    assert not problems, problems


@pytest.mark.browser
@pytest.mark.slow
def test_page_says_what_a_proxy_answered_and_what_a_drop_left_out(live_server, image_file):
    """An HTML 413 from a proxy showed as "the server did not answer: Unexpected token '<'",
    and of several dropped files the first alone was read, without a word."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    data = base64.b64encode(image_file.read_bytes()).decode("ascii")
    drop_two = """data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        for (const name of ["a.png", "b.png"]) {
            dt.items.add(new File([bytes], name, {type: "image/png"}));
        }
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }"""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.evaluate(drop_two, data)
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            status = page.inner_text("#status")
            assert status.startswith("a.png") and "the 1 other dropped file was not read" in status
            page.route("**/api/predict", lambda route: route.fulfill(
                status=413, content_type="text/html",
                body="<html><h1>413 Request Entity Too Large</h1></html>"))
            page.evaluate(drop_two, data)
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            assert page.inner_text("#error").startswith("error 413")
        finally:
            browser.close()


# --- the serve command ----------------------------------------------------------------------


def test_busy_port_is_one_line_and_no_banner(trained_run, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = main(["serve", str(trained_run), "--port", str(port), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    reason = "cannot listen (address already in use)"
    assert err == f"pneumoscan serve: error: 127.0.0.1:{port}: {reason}\n"


@pytest.mark.parametrize("system, reuses", [("posix", True), ("nt", False)])
def test_the_address_is_reused_only_where_that_cannot_share_a_busy_port(system, reuses,
                                                                         monkeypatch):
    # On Windows SO_REUSEADDR lets a second server bind a port another is listening on.
    import pneumoscan.commands.serve as serve_command

    monkeypatch.setattr(serve_command.os, "name", system)
    with serve_command.listen("127.0.0.1", 0) as sock:
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) is reuses


def test_unknown_host_is_one_line_and_no_banner(trained_run, capsys):
    status = main(["serve", str(trained_run), "--host", "999.1.1.1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("pneumoscan serve: error: 999.1.1.1:8000: unknown host (")
    assert err.count("\n") == 1


def _request(port: int, method: str, path: str, body: bytes = b"", headers=None):
    import http.client  # not urllib: no proxy from the environment

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _serve_process(run) -> subprocess.Popen:
    """The real command in its own process, its output through real pipes."""
    command = [sys.executable, "-m", "pneumoscan", "serve", str(run), "--port", "0",
               "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "WORLD_SIZE")}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _stop(process: subprocess.Popen, sig: int) -> tuple[str, str]:
    process.send_signal(sig)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out, _without_grid_warning(err)


def _without_grid_warning(err: str) -> str:
    """stderr less the warning serve gives as it starts for this 32 px run: its Grad-CAM layer
    is one cell (test_a_single_cell_grad_cam_layer_is_warned_of_at_start)."""
    return "".join(line for line in err.splitlines(keepends=True)
                   if not line.startswith("warning: Grad-CAM's layer features.block4 gives a 1"))


def test_serve_port_0_prints_the_real_port_and_keeps_stderr_clean(trained_run, image_file):
    # The banner through a pipe, the port it got, and a stderr with nothing on it after a
    # malformed upload and Ctrl-C.
    process = _serve_process(trained_run)
    try:
        banner = _read_line(process, timeout=120)
        match = re.fullmatch(r"pneumoscan serve: http://127\.0\.0\.1:(\d+)/ .*\n", banner)
        assert match, banner
        port = int(match[1])
        assert port != 0
        assert _request(port, "GET", "/api/health")[0] == 200
        body, content_type = _malformed(image_file.read_bytes())["wrong boundary"]
        status, answer = _request(port, "POST", "/api/predict", body,
                                  {"content-type": content_type})
        assert status == 422 and b"malformed multipart body" in answer
    finally:
        out, err = _stop(process, signal.SIGINT)
    assert process.returncode == 0 and out == "" and err == ""


def test_serve_stopped_by_sigterm_says_so_with_143(trained_run):
    """uvicorn stops gracefully on SIGTERM, then re-raises it: the end must still say 143."""
    process = _serve_process(trained_run)
    try:
        _read_line(process, timeout=120)
    finally:
        _, err = _stop(process, signal.SIGTERM)
    assert process.returncode == 143 and err == "pneumoscan serve: terminated\n", err


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line of the process's stdout, or a failure naming its stderr."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        process.kill()
        pytest.fail(f"no banner from serve; stderr: {process.communicate()[1]!r}")
    return lines[0]


def test_a_probability_that_is_not_finite_is_an_error_not_normal(client, image_file,
                                                                  monkeypatch):
    """Finite weights can overflow to NaN; NaN is never above the threshold, so the answer was
    200 with label NORMAL and probability null (the page showed 0.0%)."""
    from pneumoscan.model_io import Predictor

    monkeypatch.setattr(Predictor, "predict_proba", lambda self, images: np.full(len(images),
                                                                                 np.nan))
    r = _post(client, image_file.read_bytes(), "scan.png")
    assert r.status_code == 500
    assert r.json() == {"error": "scan.png: the model's probability is not finite "
                                 "(NaN or infinity)"}


def test_health_and_page_answer_while_every_worker_thread_waits_on_a_prediction(
        live_server, image_file, monkeypatch):
    # Predictions run in the server's thread pool (40 threads) and wait there for the model.
    # Health, model info and the page must not queue behind them.
    release, entered, lock = threading.Event(), [], threading.Lock()

    def held_prediction(self, data, filename):
        with lock:
            entered.append(filename)
        release.wait(60)
        return {"filename": filename}

    monkeypatch.setattr(app_module._Service, "predict", held_prediction)
    port = int(live_server.rsplit(":", 1)[1])
    boundary = "pneumoscanboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += image_file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    senders = [threading.Thread(target=_request, args=(port, "POST", "/api/predict", body,
                                                       headers), daemon=True)
               for _ in range(80)]  # anyio's pool has 40 threads
    try:
        for sender in senders:
            sender.start()
        deadline, seen = time.monotonic() + 30, -1
        while seen != len(entered) and time.monotonic() < deadline:  # until no more get in
            seen = len(entered)
            time.sleep(1.0)
        assert 0 < len(entered) < len(senders)  # every worker thread is taken; the rest queue
        import http.client

        for path in ("/api/health", "/api/model", "/"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", path)
                assert connection.getresponse().status == 200, path
            finally:
                connection.close()
    finally:
        release.set()
        for sender in senders:
            sender.join(timeout=30)


def test_ctrl_c_while_answering_says_it_waits_and_a_second_stops_quietly(trained_run,
                                                                          image_file):
    # The first Ctrl-C waits for the requests in progress, which can take a while: it says so.
    # A second stops at once; it printed a traceback for every request it cancelled.
    slow_model = (
        "import sys, time\n"
        "import pneumoscan.serve.app as app\n"
        "predict = app._Service.predict\n"
        "app._Service.predict = lambda self, *a: (time.sleep(60), predict(self, *a))[1]\n"
        "from pneumoscan.cli import console_main\n"
        "sys.argv = ['pneumoscan', *sys.argv[1:]]\n"
        "console_main()\n"
    )
    command = [sys.executable, "-c", slow_model, "serve", str(trained_run), "--port", "0",
               "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        port = int(re.search(r":(\d+)/", _read_line(process, timeout=120))[1])
        body = _part(image_file.read_bytes())

        def cut_off_request():  # the second Ctrl-C cuts it off
            with contextlib.suppress(OSError):
                _request(port, "POST", "/api/predict", body, {"content-type": MULTIPART})

        for _ in range(2):
            threading.Thread(target=cut_off_request, daemon=True).start()
        time.sleep(2.0)  # both requests are in the model by now
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None  # still waiting for them
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        err = _without_grid_warning(err)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert err == ("pneumoscan serve: stopping once the 2 prediction(s) in progress are "
                   "answered (Ctrl-C again stops at once)\n")
    assert process.returncode == 130


def test_a_single_cell_grad_cam_layer_is_warned_of_at_start(trained_run, caplog):
    """seed_cnn at 32 px has one cell on its Grad-CAM layer: every heat map is one colour."""
    pytest.importorskip("captum", reason="Grad-CAM needs captum")
    with caplog.at_level(logging.WARNING, logger="pneumoscan.serve"):
        with TestClient(create_app(trained_run)):
            pass
    assert any(r.getMessage().startswith("warning: Grad-CAM's layer features.block4 gives a 1 x 1 "
                                         "grid at 32 px") for r in caplog.records)
