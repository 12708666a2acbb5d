"""pneumoscan serve: the web service and browser page for a run, on 127.0.0.1 unless told."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run(args: argparse.Namespace) -> int:
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.serve.app import create_app
    from pneumoscan.train import resolve_device

    if not 0 <= args.port <= 65535:
        raise PneumoscanError(f"--port {args.port}: expected 0..65535")
    try:
        import uvicorn
    except ImportError:
        raise PneumoscanError("serve needs uvicorn: pip install 'pneumoscan[serve]'") from None
    app = create_app(args.run, device=str(resolve_device(args.device)))
    print(f"pneumoscan serve: http://{args.host}:{args.port}/  (research use, not a medical "
          "device; Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
