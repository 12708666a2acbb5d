"""How long the command line takes to answer: ``--help``, and ``predict`` on one image.

    python benchmarks/cli_startup.py --run RUN --image FILE [--repeat 3]

Each command runs in a fresh Python process (as a user types it), ``--repeat`` times; the best
wall time counts. Beside them, as references in the same run: a bare Python start, and Python
importing torch, and torch with timm (which the standard backbones need). Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time


def best_wall_s(argv: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return round(best, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory to predict with")
    p.add_argument("--image", required=True, help="one image file")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    py = sys.executable
    cases = {
        "python": [py, "-c", "pass"],
        "import torch": [py, "-c", "import torch"],
        "import torch, timm": [py, "-c", "import torch, timm"],
        "pneumoscan --help": [py, "-m", "pneumoscan", "--help"],
        "pneumoscan predict (one image)": [py, "-m", "pneumoscan", "predict", args.run,
                                           args.image, "--quiet", "--device", "cpu"],
    }
    figures = {name: best_wall_s(cmd, args.repeat) for name, cmd in cases.items()}
    for name, seconds in figures.items():
        print(f"{name:<32}{seconds:>7.2f} s")
    print(json.dumps({
        "benchmark": "cli_startup", "best_of": args.repeat, "wall_s": figures,
        "command": "python benchmarks/cli_startup.py " + shlex.join(argv or sys.argv[1:]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
