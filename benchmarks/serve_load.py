"""Load on the web service: throughput, latency and the server's memory under concurrent uploads.

Starts ``pneumoscan serve RUN`` on 127.0.0.1 on a free port in a subprocess, posts the same
X-ray to /api/predict ``--requests`` times with ``--concurrency`` requests in flight (httpx,
async), then prints a summary and, last, one JSON line:

    PYTHONPATH=src python benchmarks/serve_load.py --run runs/demo/run --requests 1000 \\
        --concurrency 16 [--image FILE] [--max-seconds 300]

With ``--abuse`` the same run also mixes in hostile requests, a share ``--abuse-share``
(default 0.2) of all requests sent, spread evenly over the kinds in ``ABUSE_KINDS``:
oversize uploads (honest Content-Length, chunked without a length, a length declared and
never sent), malformed multipart (wrong boundary, no boundary, truncated body, no closing
boundary, garbage part headers), a JSON body, non-images (text, HTML, random bytes), a PNG
whose header declares a pixel bomb, a truncated JPEG, an empty file, a wrong field name,
clients that drip a valid upload slowly, and clients that send half a body and hang up.
Every valid request must get 200, every hostile one its expected status (413/415/422) with a
JSON ``{"error": ...}`` body; the server's RSS and open files are sampled throughout, its
log is searched for tracebacks, and /api/health must answer 200 at the end:

    PYTHONPATH=src python benchmarks/serve_load.py --run /tmp/abuse-demo/run --requests 1000 \\
        --concurrency 32 --abuse

``--requests`` counts the valid requests; the hostile ones come on top. Only 127.0.0.1 is
contacted, and sending stops after ``--max-seconds``. The exit status is 0 only when there
were no transport errors, no mismatches, no tracebacks in the server's log and the final
health check passed.

Every answer includes Grad-CAM (when captum is installed), as the page asks for it; the server
runs inference under one lock, so throughput is that of one model on the server's cores.
Without --image a synthetic 512 px image is posted (a drawn picture, not an X-ray).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # the server's limit (pneumoscan.serve.app.MAX_UPLOAD_BYTES)
OVERSIZE_BYTES = MAX_UPLOAD_BYTES + 1024 * 1024  # over the limit and its envelope allowance
SAMPLE_SECONDS = 0.25  # how often the server's RSS is read
MAX_EXAMPLES = 8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--requests", type=int, default=1000, help="valid requests to send")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image", help="file to post (default: a synthetic 512 px PNG)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="stop sending after this long; unsent requests are not counted")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--abuse", action="store_true",
                   help="mix hostile requests in and check every answer's status")
    p.add_argument("--abuse-share", type=float, default=0.2,
                   help="share of all requests that are hostile, with --abuse (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="order of valid and hostile requests")
    args = p.parse_args(argv)
    if not 0 < args.abuse_share < 1:
        p.error("--abuse-share must be between 0 and 1")

    import psutil

    payload, name = _payload(args.image)
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)
    server = _start_server(args.run, port, args.device, log)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, server, log.name, timeout=120)
        sampler = _Sampler(psutil.Process(server.pid))
        sampler.start()
        try:
            if args.abuse:
                plan = _plan(args.requests, args.abuse_share, args.seed)
                result = asyncio.run(_run_plan(base, port, plan, payload, name, args))
            else:
                result = asyncio.run(_load(base, payload, name, args))
        finally:
            sampler.stop()
        healthy = _still_healthy(base, server)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    server_log = Path(log.name).read_text(errors="replace")
    Path(log.name).unlink(missing_ok=True)
    if args.abuse:
        return _report_abuse(result, sampler, healthy, server_log, payload, args)
    return _report_plain(result, sampler, payload, args)


# --- the plain load run ----------------------------------------------------------------------


def _report_plain(result: dict, sampler: _Sampler, payload: bytes, args) -> int:
    latencies = np.array(result["latencies"]) * 1000
    summary = {
        "requests": result["sent"],
        "ok": result["ok"],
        "errors": result["errors"],
        "concurrency": args.concurrency,
        "seconds": round(result["seconds"], 2),
        "throughput_rps": round(result["ok"] / result["seconds"], 2) if result["seconds"] else 0,
        "latency_ms_p50": _percentile(latencies, 50),
        "latency_ms_p99": _percentile(latencies, 99),
        "server_rss_mb_before": _mb(sampler.samples[0][1]),
        "server_rss_mb_after": _mb(sampler.samples[-1][1]),
        "image_bytes": len(payload),
        "cpu_count": os.cpu_count(),
    }
    print(f"{summary['ok']}/{summary['requests']} ok in {summary['seconds']} s: "
          f"{summary['throughput_rps']} req/s, p50 {summary['latency_ms_p50']} ms, "
          f"p99 {summary['latency_ms_p99']} ms, RSS {summary['server_rss_mb_before']} -> "
          f"{summary['server_rss_mb_after']} MB")
    print(json.dumps(summary))
    return 0 if result["errors"] == 0 else 1


async def _load(base: str, payload: bytes, name: str, args) -> dict:
    import httpx

    latencies: list[float] = []
    errors = sent = 0
    counter = iter(range(args.requests))
    deadline = time.monotonic() + args.max_seconds
    limits = httpx.Limits(max_connections=args.concurrency)

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, sent
            for _ in counter:  # shared iterator: the workers together send exactly --requests
                if time.monotonic() > deadline:
                    return
                sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/api/predict",
                                                 files={"file": (name, payload)})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "sent": sent, "ok": len(latencies),
            "seconds": seconds}


# --- the hostile requests ------------------------------------------------------------------


@dataclass
class Answer:
    """What came back: a status (None when the client hung up on purpose) and the body."""

    status: int | None
    body: bytes = b""
    content_type: str = ""


@dataclass
class Context:
    """What every request kind may need: the clients, the server's port and the payloads."""

    client: object  # httpx.AsyncClient
    port: int
    image: bytes
    name: str
    blobs: dict[str, bytes] = field(default_factory=dict)


Send = Callable[[Context], Awaitable[Answer]]
BOUNDARY = "pneumoscanabuse"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _part(data: bytes, *, field_name: str = "file", filename: str = "x.png",
          close: bool = True, boundary: str = BOUNDARY) -> bytes:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n" if close else "\r\n"
    return head.encode() + data + tail.encode()


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring a huge image, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(body, zlib.crc32(kind))
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _blobs(image: bytes) -> dict[str, bytes]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    # Seeded "random" bytes; a leading NUL keeps them from starting with any image magic.
    noise = b"\0" + np.random.default_rng(7).integers(0, 256, 8191, dtype=np.uint8).tobytes()
    return {
        "oversize": b"\x89PNG\r\n\x1a\n" + bytes(OVERSIZE_BYTES),
        "megabyte": bytes(1024 * 1024),
        "text": b"name,value\nfoo,1\nbar,2\n" * 20,
        "html": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "noise": noise,
        "bomb": _png_declaring(60_000, 60_000),
        "jpeg_cut": jpeg[: len(jpeg) // 2],
        "valid_body": _part(image),
    }


async def _post(ctx: Context, **kwargs) -> Answer:
    response = await ctx.client.post("/api/predict", **kwargs)
    return Answer(response.status_code, response.content,
                  response.headers.get("content-type", ""))


def _file(ctx: Context, data: bytes, filename: str = "x.png",
          field_name: str = "file") -> Awaitable[Answer]:
    return _post(ctx, files={field_name: (filename, data, "application/octet-stream")})


def _raw_body(ctx: Context, body: bytes, content_type: str = MULTIPART) -> Awaitable[Answer]:
    return _post(ctx, content=body, headers={"content-type": content_type})


async def _oversize_chunked(ctx: Context) -> Answer:
    async def body() -> AsyncIterator[bytes]:  # an async iterator: httpx sends it chunked
        yield _part(b"", close=False)[:-2]
        for _ in range(OVERSIZE_BYTES // len(ctx.blobs["megabyte"]) + 1):
            yield ctx.blobs["megabyte"]

    return await _raw_body(ctx, body())


def _http_head(length: int, content_type: str = MULTIPART) -> bytes:
    return (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    raw = await asyncio.wait_for(reader.read(), timeout=60)  # Connection: close ends it
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(status, body, headers.get("content-type", ""))


async def _declared_only(ctx: Context) -> Answer:
    """Content-Length far over the limit, and no body at all: refused from the header."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(_http_head(OVERSIZE_BYTES * 4))
        await writer.drain()
        return await _read_answer(reader)
    finally:
        writer.close()


async def _slow_valid(ctx: Context) -> Answer:
    """A valid upload dripped in eight pieces 50 ms apart: slow, but it must still succeed."""
    body = ctx.blobs["valid_body"]
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    try:
        writer.write(_http_head(len(body)))
        step = len(body) // 8 + 1
        for i in range(0, len(body), step):
            writer.write(body[i:i + step])
            await writer.drain()
            await asyncio.sleep(0.05)
        return await _read_answer(reader)
    finally:
        writer.close()


async def _aborted(ctx: Context) -> Answer:
    """Headers and half the body, a pause, then the connection is dropped."""
    body = ctx.blobs["valid_body"]
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    writer.write(_http_head(len(body)) + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()  # no FIN handshake niceties: an RST, like a killed client
    return Answer(None)


# kind -> (expected status, how to send it). None: nothing to expect, the client hung up.
ABUSE_KINDS: dict[str, tuple[int | None, Send]] = {
    "oversize_length": (413, lambda c: _file(c, c.blobs["oversize"])),
    "oversize_chunked": (413, _oversize_chunked),
    "oversize_declared": (413, _declared_only),
    "pixel_bomb_png": (413, lambda c: _file(c, c.blobs["bomb"], "bomb.png")),
    "text": (415, lambda c: _file(c, c.blobs["text"], "table.csv")),
    "html": (415, lambda c: _file(c, c.blobs["html"], "page.html")),
    "random_bytes": (415, lambda c: _file(c, c.blobs["noise"], "noise.bin")),
    "truncated_jpeg": (422, lambda c: _file(c, c.blobs["jpeg_cut"], "cut.jpg")),
    "empty_file": (422, lambda c: _file(c, b"", "empty.png")),
    "wrong_field": (422, lambda c: _file(c, c.image, c.name, field_name="image")),
    "not_multipart": (415, lambda c: _post(c, json={"file": "/etc/passwd"})),
    "no_boundary": (422, lambda c: _raw_body(c, c.blobs["valid_body"], "multipart/form-data")),
    "bad_boundary": (422, lambda c: _raw_body(c, c.blobs["valid_body"],
                                              "multipart/form-data; boundary=other")),
    "truncated_body": (422, lambda c: _raw_body(c, c.blobs["valid_body"][:300])),
    "missing_close": (422, lambda c: _raw_body(c, _part(c.image, close=False))),
    "garbage_headers": (422, lambda c: _raw_body(
        c, f"--{BOUNDARY}\r\n\x01\x02 not a header\r\n\r\n".encode() + c.image
        + f"\r\n--{BOUNDARY}--\r\n".encode())),
    "slow_valid": (200, _slow_valid),
    "aborted": (None, _aborted),
}


def _plan(valid: int, share: float, seed: int) -> list[str]:
    """The kinds to send, shuffled: ``valid`` valid ones and hostile ones making ``share``."""
    hostile = round(valid * share / (1 - share))
    kinds = list(ABUSE_KINDS)
    plan = ["valid"] * valid + [kinds[i % len(kinds)] for i in range(hostile)]
    random.Random(seed).shuffle(plan)
    return plan


async def _run_plan(base: str, port: int, plan: list[str], image: bytes, name: str,
                    args) -> dict:
    import httpx

    records: list[tuple[str, Answer | None, float, str]] = []  # kind, answer, seconds, error
    queue = iter(plan)
    deadline = time.monotonic() + args.max_seconds
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        ctx = Context(client, port, image, name, _blobs(image))
        valid_send: Send = lambda c: _file(c, c.image, c.name)  # noqa: E731

        async def worker() -> None:
            for kind in queue:  # shared iterator: the workers together send the plan once
                if time.monotonic() > deadline:
                    return
                send = valid_send if kind == "valid" else ABUSE_KINDS[kind][1]
                start = time.perf_counter()
                try:
                    answer, error = await send(ctx), ""
                except (httpx.HTTPError, OSError, asyncio.TimeoutError, ValueError,
                        IndexError) as e:
                    answer, error = None, f"{type(e).__name__}: {e}"[:200]
                records.append((kind, answer, time.perf_counter() - start, error))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
    return {"records": records, "seconds": seconds, "planned": len(plan)}


def _is_json_error(answer: Answer) -> bool:
    if not answer.content_type.startswith("application/json"):
        return False
    try:
        body = json.loads(answer.body)
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and bool(body["error"])


def _check(kind: str, answer: Answer | None) -> bool:
    if answer is None:
        return False
    expected = 200 if kind == "valid" else ABUSE_KINDS[kind][0]
    if expected is None:  # the client hung up; the server's health is checked at the end
        return answer.status is None
    if answer.status != expected:
        return False
    return expected == 200 or _is_json_error(answer)


def _report_abuse(result: dict, sampler: _Sampler, healthy: bool, server_log: str,
                  payload: bytes, args) -> int:
    records = result["records"]
    by_kind: dict[str, list] = defaultdict(list)
    for record in records:
        by_kind[record[0]].append(record)
    mismatches, examples, errors = 0, [], 0
    print(f"{'kind':<18} {'expect':>6} {'sent':>5} {'ok':>5}  statuses")
    for kind in ["valid", *ABUSE_KINDS]:
        rows = by_kind.get(kind, [])
        expected = 200 if kind == "valid" else ABUSE_KINDS[kind][0]
        statuses = Counter("error" if a is None else (a.status or "hung up")
                           for _, a, _, _ in rows)
        ok = 0
        for _, answer, _, error in rows:
            if _check(kind, answer):
                ok += 1
                continue
            if answer is None:
                errors += 1
            else:
                mismatches += 1
            if len(examples) < MAX_EXAMPLES and not any(e["kind"] == kind for e in examples):
                examples.append({"kind": kind, "expected": expected,
                                 "got": None if answer is None else answer.status,
                                 "body": error or (answer.body[:160].decode("utf-8", "replace")
                                                   if answer else "")})
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str))
        print(f"{kind:<18} {str(expected or '-'):>6} {len(rows):>5} {ok:>5}  {shown}")

    valid = by_kind.get("valid", [])
    latencies = np.array([s for _, a, s, _ in valid if a and a.status == 200]) * 1000
    hostile = [r for r in records if r[0] != "valid"]
    seconds = result["seconds"]
    times = np.array([t for t, _, _ in sampler.samples])
    rss = np.array([r for _, r, _ in sampler.samples], dtype=float)
    fds = [f for _, _, f in sampler.samples if f is not None]
    summary = {
        "requests": len(records),
        "planned": result["planned"],
        "valid_requests": len(valid),
        "abusive_requests": len(hostile),
        "concurrency": args.concurrency,
        "valid_ok": sum(_check("valid", a) for _, a, _, _ in valid),
        "abusive_ok": sum(_check(k, a) for k, a, _, _ in hostile),
        "mismatches": mismatches,
        "mismatch_examples": examples,
        "errors": errors,
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(records) / seconds, 2) if seconds else 0,
        "valid_throughput_rps": round(len(latencies) / seconds, 2) if seconds else 0,
        "valid_latency_ms_p50": _percentile(latencies, 50),
        "valid_latency_ms_p99": _percentile(latencies, 99),
        "rss_start_mb": _mb(rss[0]),
        "rss_peak_mb": _mb(rss.max()),
        "rss_end_mb": _mb(rss[-1]),
        "rss_growth_second_half_mb": _second_half_growth(times, rss),
        "rss_samples": len(rss),
        "open_fds_start": fds[0] if fds else None,
        "open_fds_end": fds[-1] if fds else None,
        "server_tracebacks": server_log.count("Traceback (most recent call last)"),
        "health_after": healthy,
        "image_bytes": len(payload),
        "cpu_count": os.cpu_count(),
    }
    print(f"valid {summary['valid_ok']}/{len(valid)} ok, hostile {summary['abusive_ok']}/"
          f"{len(hostile)} ok, {mismatches} mismatches, {errors} errors in {summary['seconds']} s;"
          f" valid p50 {summary['valid_latency_ms_p50']} ms, p99 "
          f"{summary['valid_latency_ms_p99']} ms; RSS {summary['rss_start_mb']} -> peak "
          f"{summary['rss_peak_mb']} -> {summary['rss_end_mb']} MB (second half "
          f"{summary['rss_growth_second_half_mb']:+} MB); health after: {healthy}")
    print(json.dumps(summary))
    clean = (errors == 0 and mismatches == 0 and healthy and summary["server_tracebacks"] == 0
             and len(records) == result["planned"])
    return 0 if clean else 1


def _second_half_growth(times: np.ndarray, rss: np.ndarray) -> float:
    """RSS at the end minus RSS at the middle of the run, each the median of a short window,
    so that one sample taken mid-request does not decide it."""
    if len(rss) < 4:
        return 0.0
    middle = times[0] + (times[-1] - times[0]) / 2
    window = max(2, len(rss) // 20)
    at_middle = int(np.searchsorted(times, middle))
    mid = np.median(rss[max(0, at_middle - window // 2): at_middle + window // 2 + 1])
    end = np.median(rss[-window:])
    return _mb(end - mid)


# --- the server and its memory -----------------------------------------------------------


class _Sampler:
    """Reads the server's RSS (and open file descriptors) every SAMPLE_SECONDS in a thread."""

    def __init__(self, process):
        self.process = process
        self.samples: list[tuple[float, int, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> None:
        try:
            fds = self.process.num_fds() if hasattr(self.process, "num_fds") else None
            self.samples.append((time.monotonic(), self.process.memory_info().rss, fds))
        except Exception:  # the process went away; the health check will say so
            pass

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._read()

    def start(self) -> None:
        self._read()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def _mb(value: float) -> float:
    return round(float(value) / 2**20, 1)


def _payload(image: str | None) -> tuple[bytes, str]:
    if image:
        return Path(image).read_bytes(), Path(image).name
    from PIL import Image

    from pneumoscan.data.synthetic import synthetic_xray

    array = synthetic_xray(np.random.default_rng(0), 512, pneumonia=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue(), "synthetic.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(run: str, port: int, device: str, log) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get(
        "PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pneumoscan", "serve", run, "--host", "127.0.0.1",
           "--port", str(port), "--device", device]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _wait_healthy(base: str, server: subprocess.Popen, log: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-2000:]
            raise SystemExit(f"the server exited with status {server.returncode}:\n{tail}")
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


def _still_healthy(base: str, server: subprocess.Popen) -> bool:
    import httpx

    if server.poll() is not None:
        return False
    try:
        response = httpx.get(base + "/api/health", timeout=10)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and response.json().get("status") == "ok"


if __name__ == "__main__":
    sys.exit(main())
