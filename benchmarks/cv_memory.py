"""Memory of a K-fold cross-validation: the process's RSS after decoding and after each fold.

``pneumoscan cv`` decodes the data set once and each fold slices it with index arrays and frees
its copies, so the resident memory should stay flat from fold to fold instead of growing by one
training set a fold. This runs ``pneumoscan.cv.cross_validate`` in this process and prints, after
the decode and after each fold, the current RSS and the peak RSS so far
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), as a table, then one JSON line with the figures
and the command. On Linux the peak is started afresh at each stage (writing 5 to
``/proc/self/clear_refs`` resets it), so each fold's row shows that fold's own peak; elsewhere
it is the peak since the process started.

    PYTHONPATH=src python benchmarks/cv_memory.py                      # 5 folds, 224 px, 1 epoch
    PYTHONPATH=src python benchmarks/cv_memory.py --image-size 64 --folds 5 --epochs 1
    PYTHONPATH=src python benchmarks/cv_memory.py --image-size 224 --subset 1000
    PYTHONPATH=src python benchmarks/cv_memory.py --low-memory          # as cv --low-memory

``--subset N`` cross-validates N images drawn at random
(the folds still group them by patient) through a folder of symbolic links, so the
file names and hence the patient ids stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray_224"


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def restart_peak() -> bool:
    """Start measuring the peak afresh (Linux only); False where the peak cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def subset_folder(data: Path, n: int, seed: int, into: Path) -> Path:
    """A train/NORMAL, train/PNEUMONIA folder of links to ``n`` of ``data``'s images."""
    import numpy as np

    from pneumoscan import CLASS_NAMES
    from pneumoscan.data.discover import discover

    samples = discover(data)["train"]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(n, len(samples)), replace=False)
    for i in chosen:
        s = samples[i]
        link = into / "train" / CLASS_NAMES[s.label] / s.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.path.resolve())
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--recipe", default="seed", help="seed (default), strong or cpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--subset", type=int, help="cross-validate this many images only")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--low-memory", action="store_true", help="as cv --low-memory")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"{args.data}: no such folder (pass --data)", file=sys.stderr)
        return 2

    from pneumoscan.config import build_config
    from pneumoscan.cv import cross_validate

    rows: list[dict] = []
    start = time.perf_counter()
    per_stage = restart_peak()

    def record(stage: str) -> None:
        rows.append({"stage": stage, "rss_mib": round(current_rss_mib(), 1),
                     "peak_rss_mib": round(peak_rss_mib(), 1),
                     "seconds": round(time.perf_counter() - start, 1)})
        r = rows[-1]
        print(f"[memory] {r['stage']:<8} rss {r['rss_mib']:8.1f} MiB  "
              f"peak {r['peak_rss_mib']:8.1f} MiB"
              f"  {r['seconds']:7.1f} s", flush=True)
        restart_peak()  # the next row's peak is that stage's own

    with tempfile.TemporaryDirectory(prefix="cv-memory-") as tmp:
        data = Path(args.data)
        if args.subset:
            data = subset_folder(data, args.subset, args.seed, Path(tmp) / "data")
        os.environ.setdefault("PNEUMOSCAN_CACHE", str(Path(tmp) / "cache"))
        device_type = "cuda" if args.device == "cuda" else "cpu"
        cfg = build_config(args.recipe, device_type, {
            "data": str(data), "out": str(Path(tmp) / "cv"), "model": args.model,
            "image_size": args.image_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
            "low_memory": args.low_memory or None,
        })
        record("start")
        # The first fold callback comes after the decode and the first fold; the decode alone is
        # measured by loading the data once beforehand (the same cache serves cross_validate).
        from pneumoscan.allocator import low_memory_mode
        from pneumoscan.data.dataset import load_data

        low_memory_mode(cfg.low_memory)  # as cross_validate does, before the first large buffer
        decoded = load_data(cfg.data, cfg.image_size, validation="pool", progress=False)
        n_images = len(decoded.train)
        del decoded
        record("decoded")
        cross_validate(cfg, args.folds, progress=False,
                       after_fold=lambda r: record(f"fold {r.fold}"))
        record("end")

    print()
    print(f"{'stage':<10}{'rss MiB':>10}{'peak MiB':>10}{'s':>8}   "
          f"(peak: {'of the stage alone' if per_stage else 'since the start'})")
    for r in rows:
        print(f"{r['stage']:<10}{r['rss_mib']:>10.1f}{r['peak_rss_mib']:>10.1f}{r['seconds']:>8.1f}")
    folds = [r for r in rows if r["stage"].startswith("fold")]
    growth = folds[-1]["rss_mib"] - folds[0]["rss_mib"] if folds else 0.0
    print(json.dumps({
        "benchmark": "cv_memory",
        "command": "python benchmarks/cv_memory.py " + shlex.join(argv or sys.argv[1:]),
        "images": n_images, "folds": args.folds, "image_size": args.image_size,
        "epochs": args.epochs, "model": args.model, "recipe": cfg.recipe,
        "rss_growth_first_to_last_fold_mib": round(growth, 1),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rows), "peak_per_stage": per_stage,
        "rows": rows,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
