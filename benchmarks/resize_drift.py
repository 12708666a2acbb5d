"""How far a model's probabilities move when its images are decoded at another size and resized.

    python benchmarks/resize_drift.py RUN DIR [--sizes 64,224] [--limit 200]

RUN is a single-model run; DIR a folder of images (searched recursively). Each image is
predicted as the run takes it (decoded at its own size, as in training) and decoded at each of
``--sizes`` and then resized to the run's size, as a stack's member was given its images when
they came from one decode at the stack's largest size. Prints the median, 95th percentile and
largest change of probability and how many labels flip, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pneumoscan.data.decode import read_gray  # noqa: E402
from pneumoscan.model_io import load_predictor  # noqa: E402
from pneumoscan.predict import expand_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("folder")
    p.add_argument("--sizes", default="64,224", help="decode sizes to compare, comma-separated")
    p.add_argument("--limit", type=int, default=200, help="images taken, evenly spaced")
    args = p.parse_args()
    predictor = load_predictor(args.run, "cpu")
    if hasattr(predictor, "members"):
        sys.exit(f"{args.run}: give a single-model run (one of an ensemble's members)")
    files = expand_paths([args.folder]).files
    files = files[:: max(1, len(files) // args.limit)][: args.limit]
    own = predictor.predict_proba(np.stack([read_gray(f, predictor.image_size) for f in files]))
    label = own >= predictor.threshold
    rows = {}
    for size in (int(s) for s in args.sizes.split(",")):
        other = predictor.predict_proba(np.stack([read_gray(f, size) for f in files]))
        change = np.abs(other - own)
        rows[size] = {"median": round(float(np.median(change)), 4),
                      "p95": round(float(np.percentile(change, 95)), 4),
                      "max": round(float(change.max()), 4),
                      "labels_flipped": int(((other >= predictor.threshold) != label).sum())}
        print(f"decoded at {size} px, resized to {predictor.image_size}: change of probability "
              f"median {rows[size]['median']}, 95th percentile {rows[size]['p95']}, largest "
              f"{rows[size]['max']}; {rows[size]['labels_flipped']} of {len(files)} labels flip")
    print(json.dumps({"run": args.run, "images": len(files), "image_size": predictor.image_size,
                      "by_decode_size": rows, "command": " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
