"""A whole training run: data -> fit -> calibration and threshold on validation -> saved model ->
test figures and plots. ``train`` and ``cv`` are built from these pieces."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pneumoscan import CLASS_NAMES
from pneumoscan.allocator import low_memory_mode
from pneumoscan.config import TrainConfig
from pneumoscan.data.background import PendingData
from pneumoscan.data.dataset import (
    DataBundle,
    load_data,
    split_identity,
    test_heading,
    training_data_options,
)
from pneumoscan.device import resolve_device
from pneumoscan.distributed import DistInfo, barrier, gather_objects, process_group
from pneumoscan.environment import run_config
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import (
    choose_threshold,
    evaluate_predictions,
    fit_temperature,
    format_table,
    temperature_at_limit,
)
from pneumoscan.fileio import atomic_write_json
from pneumoscan.model_io import probabilities, save_model
from pneumoscan.run_folder import TEST_METRICS, TEST_PREDICTIONS, VAL_PREDICTIONS
from pneumoscan.run_plots import write_predictions
from pneumoscan.seen import pixel_keys, save_training_images
from pneumoscan.threshold_rules import format_threshold
from pneumoscan.train import (
    CHECKPOINT,
    describe_fit_timings,
    fit,
    predict_logits,
    run_device,
    warm_up,
)


def train_run(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
    process_started: float | None = None, data: PendingData | None = None, warn: bool = True,
) -> dict:
    """Train one model as ``cfg`` says and leave a complete run directory in ``cfg.out``.

    ``process_started``: ``time.perf_counter()``'s reading when the process started, for the
    start-up (Python, imports, joining a process group) in the closing time line. ``data``: the
    data already loading in the background (data/background.py, with ``training_data_options``);
    by default it is loaded here. ``warn``: say which files and folders the data loses (the
    runs of train --seeds after the first, on the same data, do not say it again).
    """
    device = resolve_device(cfg.device)
    low_memory_mode(cfg.low_memory)  # before anything large is allocated (once a process)
    with process_group(device.type) as dist_info:
        return _train_run(cfg, dist_info, resume=resume, progress=progress,
                          process_started=process_started, data=data, warn=warn)


def _train_run(
    cfg: TrainConfig, dist_info: DistInfo, *, resume: bool, progress: bool,
    process_started: float | None, data: PendingData | None, warn: bool,
) -> dict:
    run_dir = Path(cfg.out)
    t_start = time.perf_counter()
    startup_s = None if process_started is None else t_start - process_started
    device = run_device(cfg, dist_info)
    warm_up_s = None
    if data is None:
        bundle = load_data(cfg.data, cfg.image_size,
                           **training_data_options(cfg, progress, dist_info.is_main, warn))
    else:
        warm_up(cfg, device, dist_info.world_size)  # the GPU's one-time costs, while decoding
        if device.type == "cuda":
            warm_up_s = time.perf_counter() - t_start
        bundle = data.result()
    check_same_run(cfg, bundle, dist_info)
    if dist_info.is_main:
        # Written once the data is known to be usable, so a refused run leaves no folder behind.
        # A run resumed from its checkpoint keeps its own: fit() refuses other settings there.
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (run_dir / CHECKPOINT).exists() and (run_dir / "config.json").exists()):
            atomic_write_json(run_dir / "config.json",
                              run_config(cfg.to_dict(), device.type, dist_info.world_size))
        describe_data(bundle)
    t_data = time.perf_counter()
    result = fit(
        cfg, bundle.train, bundle.val, run_dir, class_counts=bundle.train_counts,
        dist_info=dist_info, resume=resume, progress=progress, data_fingerprint=bundle.fingerprint,
    )
    t_fit = time.perf_counter()
    summary: dict = {}
    if dist_info.is_main:
        # Before model.json, which marks a finished run: one stopped in between is not taken
        # for finished without them.
        save_training_images(run_dir, cfg.image_size,
                             pixel_keys(bundle.train.images) + pixel_keys(bundle.val.images))
        summary = finish_run(cfg, bundle, result.model, run_dir, result.history,
                             result.best_epoch)
        summary["best_epoch"] = result.best_epoch
        summary["stopped_early"] = result.stopped_early
        t_end = time.perf_counter()
        print(describe_run_time(
            total=t_end - t_start, data=t_data - t_start - (warm_up_s or 0.0),
            training=t_fit - t_data, fit_timings=result.timings, finishing=t_end - t_fit,
            startup=startup_s, warm_up=warm_up_s))
    barrier(dist_info)
    return summary


def check_same_run(cfg: TrainConfig, bundle: DataBundle, dist_info: DistInfo) -> None:
    """Refuse, on every process, a run that differs between them: on several machines each
    reads its own --data and command line. One with other files would carve other validation
    images (some of them another process's training images); other settings (a --seed, an
    --epochs) would step through other batches, and the processes would hang."""
    # Paths are each machine's own; so is --low-memory, and --pretrained's file (rank 0's
    # initial weights are every process's).
    mine = ("data", "out", "low_memory", "pretrained")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in mine}
    seen = gather_objects({"data": bundle.fingerprint, "validation": split_identity(bundle.val),
                           "settings": settings}, dist_info)
    for what in ("data", "validation", "settings"):
        if any(other[what] != seen[0][what] for other in seen[1:]):
            differ = ("data" if what != "settings" else "settings: " + ", ".join(
                sorted({k for other in seen for k, v in other["settings"].items()
                        if v != seen[0]["settings"].get(k)})))
            raise PneumoscanError(
                f"the processes' {differ} differ: every machine needs the same files in its "
                "--data and the same command line (but for --data and --out)")


def describe_run_time(
    *, total: float, data: float, training: float, fit_timings: dict[str, float],
    finishing: float, startup: float | None = None, warm_up: float | None = None,
) -> str:
    """The closing line: where a run's time went, start-up included when it is known.

    ``data`` is the time spent waiting for the data: where it loaded in the background, only
    what its loading took beyond the start-up and the GPU's warm-up.
    """
    head = f"done in {total + (startup or 0.0):.1f} s:"
    if startup is not None:
        head += f" start-up {startup:.1f} s,"
    if warm_up is not None:
        head += f" GPU warm-up {warm_up:.1f} s,"
    inside = describe_fit_timings(fit_timings)
    return (f"{head} data {data:.1f} s, training {training:.1f} s"
            f"{f' ({inside})' if inside else ''}, calibration, saving, test figures and plots "
            f"{finishing:.1f} s")


def describe_data(data: DataBundle) -> None:
    print(f"data: {data.source}")
    for name, split in data.splits().items():
        counts = ", ".join(f"{k} {v}" for k, v in split.class_counts().items())
        print(f"  {name:5s} {len(split):5d} images ({counts})")
    for note in data.notes:
        print(f"  {note}")


def finish_run(
    cfg: TrainConfig, data: DataBundle, model: torch.nn.Module, run_dir: Path, history: list[dict],
    weights_from_epoch: int | None = None,
) -> dict:
    """Calibrate and pick the threshold on validation, save the model, evaluate the test split."""
    device = next(model.parameters()).device
    val_logits = predict_logits(model, torch.from_numpy(data.val.images), cfg, device).numpy()
    temperature = fit_temperature(val_logits, data.val.labels)
    if temperature_at_limit(temperature):
        print(f"note: calibration's temperature is at its limit ({temperature:.3g}): on "
              f"{len(data.val)} validation images the model is "
              f"{'(almost) never wrong' if temperature < 1 else 'no better than chance'}, so its "
              "probabilities are not calibrated; a larger validation split would tell more",
              file=sys.stderr)
    val_prob = probabilities(val_logits, temperature)
    threshold = choose_threshold(data.val.labels, val_prob, cfg.threshold_rule)
    val_metrics = evaluate_predictions(data.val.labels, val_prob, threshold,
                                       groups=data.val.patients, paths=data.val.paths)
    write_predictions(run_dir / VAL_PREDICTIONS, labels=data.val.labels, prob=val_prob,
                      paths=data.val.paths, logits=val_logits)
    meta = {
        "architecture": cfg.model,
        "image_size": cfg.image_size,
        "in_chans": cfg.in_chans,
        "class_names": list(CLASS_NAMES),
        "intensity": {"scale": 1 / 255, "mean": cfg.mean, "std": cfg.std},
        "threshold": float(threshold),
        "threshold_rule": cfg.threshold_rule,
        "temperature": float(temperature),
        "data_fingerprint": data.fingerprint,
        "data_source": data.source,
        "validation": val_metrics,
        "epochs_trained": len(history),
        # The epoch whose weights were saved: the last, or the best restored by early stopping.
        "weights_from_epoch": weights_from_epoch or len(history),
    }
    summary = {"run": str(run_dir), "validation": val_metrics}
    if data.test is not None:
        test_logits = predict_logits(model, torch.from_numpy(data.test.images), cfg, device)
        test_prob = probabilities(test_logits.numpy(), temperature)
        summary["test"] = evaluate_predictions(data.test.labels, test_prob, threshold,
                                               groups=data.test.patients, paths=data.test.paths)
        write_predictions(run_dir / TEST_PREDICTIONS, labels=data.test.labels, prob=test_prob,
                          paths=data.test.paths, logits=test_logits.numpy())
        atomic_write_json(run_dir / TEST_METRICS, summary["test"])
    # Last but the plots (drawn from it, and drawn again by report when missing): model.json
    # marks the run finished, so a run stopped before it is not taken for one.
    save_model(run_dir, model, meta)
    print(f"validation (threshold {format_threshold(threshold)} by {cfg.threshold_rule}, "
          f"temperature {temperature:.3f}):")
    print(format_table(val_metrics))
    if "test" in summary:
        print(test_heading("test", data.test_overlap))
        print(format_table(summary["test"]))
    write_run_plots(run_dir)
    if data.skipped:
        summary["skipped"] = len(data.skipped)
    return summary


def write_run_plots(run_dir: Path) -> None:
    from pneumoscan.run_plots import write_evaluation_plots

    try:
        write_evaluation_plots(run_dir)  # the learning curves come from metrics.jsonl
    except Exception as e:  # a plot must never cost the trained model
        print(f"warning: run plots failed: {e}", file=sys.stderr)
