"""How long the command line takes to answer: ``--help``, and ``predict`` on one image.

    python benchmarks/cli_startup.py [--run RUN --image FILE] [--repeat 3] [--gpu]

Each command runs in a fresh Python process (as a user types it), ``--repeat`` times; the best
wall time counts, and the first is shown beside it (on a machine just started, the first run
reads the libraries from disk). Beside them, as references in the same run: a bare Python start,
and Python importing torch, torch with timm (which the standard backbones need), and
scikit-learn's metrics. ``--gpu`` adds what a GPU run pays before its first step: torch with
the CUDA context made, and with one cuDNN convolution done. ``predict`` is timed when ``--run``
and ``--image`` are given. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

CUDA_CONTEXT = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
CUDNN_CONV = ("import torch; x = torch.zeros(8, 16, 64, 64, device='cuda'); "
              "torch.nn.functional.conv2d(x, torch.zeros(16, 16, 3, 3, device='cuda')); "
              "torch.cuda.synchronize()")


def walls_s(argv: list[str], repeat: int) -> list[float]:
    """Each run's wall time, in order."""
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(round(time.perf_counter() - start, 2))
    return walls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run directory to predict with")
    p.add_argument("--image", help="one image file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="time the CUDA context and cuDNN too")
    args = p.parse_args(argv)
    if (args.run is None) != (args.image is None):
        p.error("give --run and --image together")

    py = sys.executable
    cases = {
        "python": [py, "-c", "pass"],
        "import torch": [py, "-c", "import torch"],
        "import torch, timm": [py, "-c", "import torch, timm"],
        "import sklearn.metrics": [py, "-c", "import sklearn.metrics"],
        "pneumoscan --help": [py, "-m", "pneumoscan", "--help"],
    }
    if args.gpu:
        cases["torch, CUDA context"] = [py, "-c", CUDA_CONTEXT]
        cases["torch, one cuDNN convolution"] = [py, "-c", CUDNN_CONV]
    if args.run is not None:
        cases["pneumoscan predict (one image)"] = [py, "-m", "pneumoscan", "predict", args.run,
                                                   args.image, "--quiet", "--device", "cpu"]
    walls = {name: walls_s(cmd, args.repeat) for name, cmd in cases.items()}
    print(f"{'':<32}{'best':>7}  {'first':>7}")
    for name, seconds in walls.items():
        print(f"{name:<32}{min(seconds):>7.2f}  {seconds[0]:>7.2f} s")
    print(json.dumps({
        "benchmark": "cli_startup", "best_of": args.repeat,
        "wall_s": {name: min(seconds) for name, seconds in walls.items()},
        "first_wall_s": {name: seconds[0] for name, seconds in walls.items()},
        "command": "python benchmarks/cli_startup.py " + shlex.join(argv or sys.argv[1:]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
