"""How fast ``pneumoscan predict`` goes through a folder: images per second, decode included.

    PYTHONPATH=src python benchmarks/predict_speed.py --run runs/demo/run --data runs/demo/data \\
        [--batch-size 32] [--device cpu] [--repeat 2]

Runs the library path of the command (expand_paths, then iter_predictions: decode a batch with
read_gray, predict, next batch) ``--repeat`` times and reports the best; the first pass also
warms the file system cache. Decoding alone is timed too, to show where the time goes. Prints a
summary and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from pneumoscan.data.decode import read_gray
    from pneumoscan.device import resolve_device
    from pneumoscan.model_io import load_predictor
    from pneumoscan.predict import expand_paths, iter_predictions

    predictor = load_predictor(args.run, resolve_device(args.device))
    files = expand_paths([args.data]).files
    if not files:
        raise SystemExit(f"{args.data}: no images found")
    best = float("inf")
    errors = 0
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        rows = list(iter_predictions(predictor, files, batch_size=args.batch_size,
                                     progress=False))
        best = min(best, time.perf_counter() - start)
        errors = sum(bool(r.error) for r in rows)
    start = time.perf_counter()
    for path in files:
        try:
            read_gray(path, predictor.image_size)
        except Exception:  # counted above already
            pass
    decode_seconds = time.perf_counter() - start
    summary = {
        "files": len(files),
        "errors": errors,
        "image_size": predictor.image_size,
        "model": predictor.name,
        "device": str(resolve_device(args.device)),
        "batch_size": args.batch_size,
        "seconds": round(best, 3),
        "images_per_s": round(len(files) / best, 1),
        "decode_only_images_per_s_one_thread": round(len(files) / decode_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(f"{summary['files']} files in {summary['seconds']} s: {summary['images_per_s']} "
          f"images/s ({summary['model']} at {summary['image_size']} px on {summary['device']})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
