"""pneumoscan export: a run (single model or ensemble) as one ONNX file, checked against PyTorch."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.export import export_onnx

    entry = export_onnx(args.run, args.onnx)
    print(f"{args.run} -> {args.onnx} (onnxruntime matches PyTorch within "
          f"{entry['max_abs_difference']:.1e} in {entry['compared']})")
    print(f"input {entry['input']['name']}: {entry['preprocessing']}")
    if not entry["recorded"]:
        print(f"note: {args.run} cannot be written to, so its model.json does not record this "
              "export (the ONNX file holds the same metadata)", file=sys.stderr)
    return 0
