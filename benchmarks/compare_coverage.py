"""How often `pneumoscan compare` says two equal models differ, by how many images they call
differently: the paired bootstrap's interval against McNemar's exact test.

    python benchmarks/compare_coverage.py [--trials 300] [--images 200] [--resamples 1000]

Two models that are equally good call the same images right, except D images (each its own
patient), each of which one of the two calls right and the other wrong, chosen by a fair coin.
For each D the script counts the share of trials in which the 95% bootstrap interval of the
accuracy difference leaves 0 out, and in which McNemar's exact p is below 0.05: both should be
near 5% or below. Where the interval leaves 0 out far more often, it is too narrow, and compare
marks the row (``compare.FEW_DISCORDANT``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from pneumoscan.compare import FEW_DISCORDANT, compare_predictions  # noqa: E402


def false_alarms(discordant: int, trials: int, images: int, resamples: int,
                 rng: np.random.Generator) -> tuple[float, float]:
    """Shares of trials where the interval leaves 0 out, and where McNemar's p < 0.05."""
    y = (np.arange(images) % 2).astype(np.int64)
    right = np.where(y == 1, 0.9, 0.1)  # both models right on every image but the discordant
    interval_says, mcnemar_says = 0, 0
    for trial in range(trials):
        p_a, p_b = right.copy(), right.copy()
        rows = rng.choice(images, size=discordant, replace=False)
        a_wrong = rng.random(discordant) < 0.5
        p_a[rows[a_wrong]] = 1 - right[rows[a_wrong]]
        p_b[rows[~a_wrong]] = 1 - right[rows[~a_wrong]]
        result = compare_predictions(y, p_a, 0.5, p_b, 0.5, n_resamples=resamples, seed=trial)
        low, high = result["ci95"]["accuracy"]
        interval_says += low > 0 or high < 0
        mcnemar_says += result["mcnemar"]["accuracy"]["p_value"] < 0.05
    return interval_says / trials, mcnemar_says / trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--discordant", default="4,8,12,20,40")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = {}
    print(f"two equal models, {args.images} images, {args.trials} trials each; "
          f"compare marks fewer than {FEW_DISCORDANT} discordant images")
    print(f"{'discordant':>10}  {'interval leaves 0 out':>22}  {'McNemar p < 0.05':>17}")
    for d in (int(x) for x in args.discordant.split(",")):
        interval, mcnemar = false_alarms(d, args.trials, args.images, args.resamples, rng)
        rows[d] = {"interval_excludes_0": interval, "mcnemar_below_0.05": mcnemar}
        print(f"{d:>10}  {interval:>22.1%}  {mcnemar:>17.1%}")
    command = "python benchmarks/compare_coverage.py " + shlex.join(argv or sys.argv[1:])
    print(json.dumps({"false_alarms": rows, "trials": args.trials, "images": args.images,
                      "resamples": args.resamples, "command": command.strip()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
