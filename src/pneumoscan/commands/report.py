"""pneumoscan report: one self-contained HTML file of a run, RUN/report.html."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where the Grad-CAM gallery is computed (a handful of images)")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.console import printable
    from pneumoscan.report import build_report

    path = build_report(args.run, device=args.device)
    print(printable(f"report -> {path}"))
    return 0
