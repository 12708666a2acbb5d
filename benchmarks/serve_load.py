"""Load on the web service: throughput, latency and the server's memory under concurrent uploads.

Starts ``pneumoscan serve RUN`` on 127.0.0.1 on a free port in a subprocess, posts the same
X-ray to /api/predict ``--requests`` times with ``--concurrency`` requests in flight (httpx,
async), then prints a summary and, last, one JSON line:

    PYTHONPATH=src python benchmarks/serve_load.py --run runs/demo/run --requests 1000 \\
        --concurrency 16 [--image FILE] [--max-seconds 300]

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
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image", help="file to post (default: a synthetic 512 px PNG)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="stop sending after this long; unsent requests are not counted")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    import psutil

    payload, name = _payload(args.image)
    port = _free_port()
    server = _start_server(args.run, port, args.device)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, server, timeout=120)
        proc = psutil.Process(server.pid)
        rss_before = proc.memory_info().rss
        result = asyncio.run(_load(base, payload, name, args))
        rss_after = proc.memory_info().rss
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = np.array(result["latencies"]) * 1000
    summary = {
        "requests": result["sent"],
        "ok": result["ok"],
        "errors": result["errors"],
        "concurrency": args.concurrency,
        "seconds": round(result["seconds"], 2),
        "throughput_rps": round(result["ok"] / result["seconds"], 2) if result["seconds"] else 0,
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "latency_ms_p99": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "server_rss_mb_before": round(rss_before / 2**20, 1),
        "server_rss_mb_after": round(rss_after / 2**20, 1),
        "image_bytes": len(payload),
        "cpu_count": os.cpu_count(),
    }
    print(f"{summary['ok']}/{summary['requests']} ok in {summary['seconds']} s: "
          f"{summary['throughput_rps']} req/s, p50 {summary['latency_ms_p50']} ms, "
          f"p99 {summary['latency_ms_p99']} ms, RSS {summary['server_rss_mb_before']} -> "
          f"{summary['server_rss_mb_after']} MB")
    print(json.dumps(summary))
    return 0 if result["errors"] == 0 else 1


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


def _start_server(run: str, port: int, device: str) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get(
        "PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pneumoscan", "serve", run, "--host", "127.0.0.1",
           "--port", str(port), "--device", device]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


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


if __name__ == "__main__":
    sys.exit(main())
