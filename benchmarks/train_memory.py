"""Peak memory and wall time of a whole `pneumoscan train` run, decoding included.

    python benchmarks/train_memory.py --data ../shared/data/chest_xray_224 --image-size 224 \
        --recipe seed --epochs 1 [--low-memory]

Runs the command in a child process with a fresh decode cache (so decoding is measured too) and
prints the child's peak resident memory (ru_maxrss: the largest of the training process and its
decode workers) and wall time, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chest_xray_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--recipe", default="seed")
    p.add_argument("--model", default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--keep-cache", action="store_true", help="reuse the user's decode cache")
    p.add_argument("--low-memory", action="store_true", help="pass --low-memory to train")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if not args.keep_cache:
            env["PNEUMOSCAN_CACHE"] = os.path.join(tmp, "cache")
        cmd = [sys.executable, "-m", "pneumoscan", "train", "--data", args.data,
               "--out", os.path.join(tmp, "run"), "--recipe", args.recipe,
               "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--quiet",
               "--device", "cpu"]
        if args.model:
            cmd += ["--model", args.model]
        if args.low_memory:
            cmd.append("--low-memory")
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB, wall {wall:.1f} s")
    print(json.dumps({"peak_rss_mib": round(peak_mib), "wall_s": round(wall, 1),
                      "command": " ".join(sys.argv), "train": " ".join(cmd[1:])}))


if __name__ == "__main__":
    main()
