"""Make a patient-grouped hold-out view of a training folder, to measure recipes honestly.

    python benchmarks/holdout.py --data ../shared/data/chest_xray_224 --out /tmp/holdout

Writes OUT/train/{NORMAL,PNEUMONIA} and OUT/test/{NORMAL,PNEUMONIA} as symbolic links to the
original files: the test side is about --fraction of the images, whole patients only, stratified
by class, with a fixed seed. `pneumoscan train --data OUT` then carves its validation split from
OUT/train by patient and reports OUT/test at the end, never selecting anything on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.data.discover import discover
from pneumoscan.data.split import patient_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chest_xray_224")
    p.add_argument("--out", required=True)
    p.add_argument("--fraction", type=float, default=0.12)
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    samples = discover(args.data)["train"]
    labels = np.array([s.label for s in samples])
    train_idx, test_idx = patient_split(labels, [s.patient for s in samples], args.fraction,
                                        args.seed)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # splits would mix
        sys.exit(f"holdout: {out} is not empty; delete it or give another --out")
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx:
            s = samples[i]
            link = out / split / CLASS_NAMES[s.label] / s.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(s.path.resolve(), link)
        counts = np.bincount(labels[idx], minlength=2)
        print(f"{split}: {len(idx)} images (NORMAL {counts[0]}, PNEUMONIA {counts[1]})")


if __name__ == "__main__":
    main()
