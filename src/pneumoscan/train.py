"""fit(): the training loop, read top to bottom.

The decoded data set is held as one uint8 tensor on the training device; each step gathers a
batch by index, augments it there, and never waits on the host. Sections: set-up, learning rate
and optimizer, the step, evaluation, early stopping and checkpoint, log.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoscan.augment import augment_batch
from pneumoscan.batchnorm import UNSETTLED_SHARE, settle_batchnorm, unsettled_share
from pneumoscan.checkpoint import CHECKPOINT_INTERVAL_S, load_checkpoint, save_checkpoint
from pneumoscan.config import (
    GPU_RECIPES,
    TrainConfig,
    check_batch_per_process,
    check_pretrained,
    describe_lr,
)
from pneumoscan.data.dataset import Split, split_identity
from pneumoscan.device import (
    CPU_HOURS_WORK_224,
    autocast,
    capture_cuda_graphs,
    configure_device,
    release_cuda_graphs,
    resolve_device,
    should_compile,
    should_graph,
    sync,
    work_224,
)
from pneumoscan.distributed import DistInfo, all_reduce_sum, broadcast_object, gather_objects
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import atomic_write_text
from pneumoscan.model_io import batched_logits
from pneumoscan.models import create_model
from pneumoscan.preprocess import eval_batch_size, normalize, to_model_input, to_unit_float
from pneumoscan.progress import format_duration, progress_bar, time_left
from pneumoscan.run_folder import CHECKPOINT, METRICS


def balanced_class_weights(counts: np.ndarray) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, n / (n_classes * n_class): 1.94 and 0.67 on Kermany."""
    counts = np.asarray(counts, dtype=np.float64)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


def build_model(cfg: TrainConfig) -> nn.Module:
    check_pretrained(cfg.model, cfg.pretrained)
    kwargs = {"pretrained": cfg.pretrained} if cfg.pretrained else {}
    return create_model(cfg.model, in_chans=cfg.in_chans, image_size=cfg.image_size, **kwargs)


def model_input(images_u8: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return to_model_input(images_u8, in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std)


def run_device(cfg: TrainConfig, dist_info: DistInfo) -> torch.device:
    """The device this process trains on: under torchrun, each process its own GPU."""
    device = resolve_device(cfg.device)
    if dist_info.enabled and device.type == "cuda":
        return torch.device("cuda", dist_info.local_rank)
    return device


def warm_up(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """Pay a GPU run's one-time costs early, while its images still decode (data/background.py).

    A throwaway model of the run's architecture takes one training forward and backward at the
    run's batch shape, and one evaluation batch. That makes the CUDA context, loads the kernels
    and lets cuDNN choose its convolution algorithms (it keeps them by shape), which fit() would
    otherwise do after the data came. Nothing else stays: the random streams are put back, and
    the activations' and gradients' memory is handed back, so CUDA graphs' own memory pool finds
    it free. A CPU has no such costs to pay ahead.
    """
    if device.type != "cuda":
        return
    configure_device(device)
    throwaway_passes(cfg, device, world_size)
    torch.cuda.empty_cache()


def throwaway_passes(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """warm_up's passes: a training step's forward and backward and an evaluation batch, on a
    model of the run's architecture that is then dropped; the random streams are put back."""
    shapes = {
        True: check_batch_per_process(cfg.batch_size, world_size),
        False: cfg.eval_batch_size or eval_batch_size(cfg.image_size, device_type=device.type),
    }
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Not pretrained: the shapes are the same, and the weights may need a download.
        model = build_model(dataclasses.replace(cfg, pretrained="")).to(device)
        model = model.to(memory_format=torch.channels_last)
        for training, batch in shapes.items():
            model.train(training)
            x = torch.zeros(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.set_grad_enabled(training), autocast(device):
                out = model(x)
            if training:
                out.float().sum().backward()
        model.zero_grad(set_to_none=True)  # freed even while a reference cycle keeps the model


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    """Cross-entropy with Keras' class_weight semantics: the batch mean of weighted losses."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    if class_weights is not None:
        loss = loss * class_weights[labels]
    return loss.mean()


def predict_logits(
    model: nn.Module, images: torch.Tensor, cfg: TrainConfig, device: torch.device
) -> torch.Tensor:
    """(N, 2) float32 logits on the CPU, in large batches, with the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return batched_logits(model, images, in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std,
                              device=device, batch_size=cfg.eval_batch_size)
    finally:
        model.train(was_training)


@dataclass
class EarlyStopping:
    """Stop when validation loss has not improved by min_delta for ``patience`` epochs."""

    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0

    def update(self, val_loss: float, epoch: int) -> bool:
        """Record an epoch; True when it is the best so far."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.wait = val_loss, epoch, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    # Seconds spent in each part of fit(), in the order they happen (describe_fit_timings).
    timings: dict[str, float] = field(default_factory=dict)


def describe_fit_timings(timings: dict[str, float]) -> str:
    """``"set-up 3.1 s, epochs 14.6 s (the first 1.2 s), ..."``: where a fit's time went.

    The first epoch is named apart because one-time costs land in it (compilation; on a GPU,
    kernel loading and cuDNN's choice of algorithms when the model is not graphed).
    """
    parts = []
    for name, seconds in timings.items():
        if name == "first epoch":
            continue
        text = f"{name} {seconds:.1f} s"
        if name == "epochs" and timings.get("first epoch", seconds) != seconds:
            text += f" (the first {timings['first epoch']:.1f} s)"
        parts.append(text)
    return ", ".join(parts)


class TrainStep:
    """One optimisation step on a batch of uint8 images already on the device.

    ``channels_last``: feed the model NHWC batches (give it a model converted to channels_last).
    """

    def __init__(self, model, optimizer, scheduler, cfg, class_weights, device, generator, *,
                 channels_last: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.class_weights, self.device, self.generator = (
            cfg, class_weights, device, generator
        )
        self.channels_last = channels_last

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor):
        cfg = self.cfg
        x = augment_batch(to_unit_float(images_u8), cfg.augment, self.generator)
        x = normalize(x, in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            logits = self.model(x)
        loss = weighted_loss(logits, labels, self.class_weights, cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss.detach(), correct


def epoch_shard(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's disjoint share of an epoch's permutation (the same one on every rank).

    Every rank gets len(perm) // world_size indices, so all take the same number of steps; the
    remainder (under world_size images) is left out of this epoch only, as the permutation is
    drawn afresh each epoch.
    """
    shard = len(perm) // world_size
    return perm[rank * shard : (rank + 1) * shard]


def steps_in_epoch(shard: int, batch: int, full_batches_only: bool) -> int:
    """Steps fit() takes an epoch: a last, partial batch counts unless it is left out.

    Left out: a single image (BatchNorm cannot train on one), or any partial batch when the
    model takes full batches only (the next epoch's fresh permutation brings those images
    back). The epoch's loop and its learning-rate schedule both take their length from here.
    """
    if batch < 2:
        return 0
    rest = shard % batch
    return shard // batch + (0 if full_batches_only or rest < 2 else 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **fused
        )
    raise PneumoscanError(f"unknown optimizer {cfg.optimizer!r}: choose adam or adamw")


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "constant":
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        if warmup_steps <= 0:
            return None
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)
        )
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=max(1, cfg.epochs * steps_per_epoch),
            pct_start=cfg.warmup_fraction,
        )
    raise PneumoscanError(f"unknown schedule {cfg.schedule!r}: choose constant or onecycle")


def fit(
    cfg: TrainConfig,
    train: Split,
    val: Split,
    run_dir: Path,
    *,
    class_counts: np.ndarray,
    train_rows: np.ndarray | None = None,
    dist_info: DistInfo = DistInfo(),
    resume: bool = False,
    progress: bool = True,
    data_fingerprint: str = "",
) -> FitResult:
    """Train as ``cfg`` says on ``train`` (or on its ``train_rows`` only), selecting on ``val``.

    ``train_rows`` lets cross-validation folds train on their rows of one shared decoded pool
    without copying those images out of it.
    """
    # ---- set-up: seeds, device, data resident on the device as uint8
    t_setup = time.perf_counter()
    timings = {"set-up": 0.0, "epochs": 0.0, "validation": 0.0, "checkpoints": 0.0}
    device = run_device(cfg, dist_info)
    configure_device(device)
    torch.manual_seed(cfg.seed)
    shuffle_gen = torch.Generator()  # seeded per epoch: same order on every rank
    augment_gen = torch.Generator(device=device)  # seeded per epoch and rank
    train_images = torch.from_numpy(np.ascontiguousarray(train.images)).to(device)
    train_labels = torch.from_numpy(train.labels).to(device)
    rows = np.arange(len(train)) if train_rows is None else np.asarray(train_rows, dtype=np.int64)
    n_train = len(rows)
    rows_on_device = torch.from_numpy(rows).to(device)
    val_images = torch.from_numpy(np.ascontiguousarray(val.images))
    val_labels = torch.from_numpy(val.labels)
    validation = split_identity(val)  # kept with the resume state: a resume validates alike

    # Same initial weights on every rank; a resumed run's come from its checkpoint, so the
    # pretrained ones (a file that may be gone, a download) are not needed.
    resuming = _agree_on_resume(resume and (run_dir / CHECKPOINT).exists(), run_dir, dist_info,
                                device)
    model = build_model(dataclasses.replace(cfg, pretrained="") if resuming else cfg).to(device)
    # channels_last is the layout of GPU tensor cores and of oneDNN's CPU kernels: 1.1 to 1.9
    # times faster on a CPU than the default layout for these models (the larger the image).
    model = model.to(memory_format=torch.channels_last)
    if cfg.low_memory and device.type == "cpu" and hasattr(model, "checkpoint_stem"):
        model.checkpoint_stem()  # --low-memory trades time for memory here too (seed_cnn.py)
    class_weights = balanced_class_weights(class_counts).to(device) if cfg.class_weights else None

    # ---- learning rate and optimizer; the global batch is split across ranks
    per_rank_batch = check_batch_per_process(cfg.batch_size, dist_info.world_size)
    shard = n_train // dist_info.world_size
    compiled = should_compile(cfg, device, n_train)
    graphed = should_graph(cfg, device, dist_info, compiled, per_rank_batch, shard)
    # Compiled and graphed models take full batches only (one shape): the last one is left out,
    # unless it is the only one (a data set smaller than the batch).
    full_batches_only = graphed or (compiled and shard >= per_rank_batch)
    steps_per_epoch = steps_in_epoch(shard, per_rank_batch, full_batches_only)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    stopper = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta)
    history: list[dict] = []
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 1

    already_stopped = False
    if resume and dist_info.is_main:
        _clear_for_resume(run_dir)
    if resuming:
        state = load_checkpoint(run_dir / CHECKPOINT, cfg, data_fingerprint, steps_per_epoch,
                                dist_info.world_size, validation)
        stopper, best_state, history = _restore(state, model, optimizer, scheduler)
        start_epoch = int(state["epoch"]) + 1
        # A run that had already stopped early must not train one epoch more on resume.
        already_stopped = stopper.should_stop
        if already_stopped:
            start_epoch = cfg.epochs + 1
        if dist_info.is_main:
            print(f"resuming {run_dir} after epoch {state['epoch']}")

    train_model = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compiled:
        train_model = torch.compile(train_model)
    if graphed:
        model.train()
        sample = model_input(train_images[rows_on_device[:per_rank_batch]], cfg)
        capture_cuda_graphs(model, sample.contiguous(memory_format=torch.channels_last))
    step = TrainStep(
        train_model, optimizer, scheduler, cfg, class_weights, device, augment_gen,
        channels_last=True,
    )
    if dist_info.is_main:
        how = " (compiled)" if compiled else " (CUDA graphs)" if graphed else ""
        _announce_start(cfg, device, how, n_train, per_rank_batch, dist_info)
    last_checkpoint = time.monotonic()
    sync(device)
    timings["set-up"] = time.perf_counter() - t_setup

    stopped_early = already_stopped
    epoch_walls: list[float] = []  # seconds each epoch took, start to checkpoint
    for epoch in range(start_epoch, cfg.epochs + 1):
        # ---- the epoch: shuffle, take this rank's shard, step through it
        model.train()
        seed_epoch(cfg.seed, epoch, dist_info.rank, shuffle_gen, augment_gen)
        perm = torch.randperm(n_train, generator=shuffle_gen)
        perm = rows_on_device[epoch_shard(perm, dist_info.rank, dist_info.world_size).to(device)]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        epoch_lr = optimizer.param_groups[0]["lr"]  # as the epoch starts (one-cycle moves it)
        sync(device)
        t0 = time.perf_counter()
        # The first steps_per_epoch batches: a left-out batch is only ever the last one.
        batches = range(0, steps_per_epoch * per_rank_batch, per_rank_batch)
        bar = _bar(len(batches), f"epoch {epoch}/{cfg.epochs}", progress and dist_info.is_main)
        for start in batches:
            idx = perm[start : start + per_rank_batch]
            loss, n_correct = step(train_images[idx], train_labels[idx])
            loss_sum += loss * len(idx)
            correct += n_correct
            seen += len(idx)
            bar.update(1)
        bar.close()
        sync(device)
        seconds = time.perf_counter() - t0
        timings["epochs"] += seconds
        timings.setdefault("first epoch", seconds)
        totals = all_reduce_sum(torch.stack([loss_sum, correct.float()]), dist_info)
        seen_total = seen * dist_info.world_size
        if not torch.isfinite(totals[0]):  # the same reduced value on every rank: all stop
            raise _diverged(f"in epoch {epoch} (the loss is not a number)", cfg)

        # ---- evaluation on the validation split (rank 0 sees every image exactly once)
        row = {
            "epoch": epoch,
            "train_loss": float(totals[0]) / max(seen_total, 1),
            "train_accuracy": float(totals[1]) / max(seen_total, 1),
        }
        if dist_info.is_main:
            t_val = time.perf_counter()
            # Early stopping and the best epoch judge the model as it would be saved now.
            judged = _as_saved(model, train_images, rows_on_device, per_rank_batch, cfg, device,
                               val_images)
            row.update(validation_figures(judged, val_images, val_labels, cfg, device))
            del judged
            timings["validation"] += time.perf_counter() - t_val
        row["lr"] = epoch_lr
        row["seconds"] = round(seconds, 3)
        row["images_per_s"] = round(seen_total / max(seconds, 1e-9), 1)

        # ---- early stopping and checkpoint
        decision = None
        if dist_info.is_main:
            improved = stopper.update(row.get("val_loss", math.inf), epoch)
            if improved and cfg.restore_best:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            decision = stopper.should_stop
        stop = broadcast_object(decision, dist_info)

        # ---- log
        if dist_info.is_main:
            history.append(row)
            # Checkpoint first: on the CPU an epoch in metrics.jsonl is then always one resume
            # keeps (on a GPU, resume may redo the epochs of the last CHECKPOINT_INTERVAL_S).
            t_checkpoint = time.perf_counter()
            last_epoch = stop or epoch == cfg.epochs
            if last_epoch or time.monotonic() - last_checkpoint >= CHECKPOINT_INTERVAL_S.get(
                device.type, 0.0
            ):
                save_checkpoint(
                    run_dir / CHECKPOINT, cfg=cfg, epoch=epoch, model=model, optimizer=optimizer,
                    scheduler=scheduler, stopper=stopper, best_state=best_state, history=history,
                    data_fingerprint=data_fingerprint, steps_per_epoch=steps_per_epoch,
                    processes=dist_info.world_size, validation=validation,
                )
                last_checkpoint = time.monotonic()
            write_metrics(run_dir, history)
            timings["checkpoints"] += time.perf_counter() - t_checkpoint
            epoch_walls.append(time.perf_counter() - t0)  # with validation and checkpoint
            if progress:
                line = _epoch_line(row)
                if not stop and epoch < cfg.epochs:
                    line += "  " + _describe_time_left(epoch_walls, cfg, epoch)
                print(line, flush=True)
        if stop:
            stopped_early = True
            if dist_info.is_main:
                print(
                    f"early stop: val loss has not improved for {cfg.early_stop_patience} epochs "
                    f"(best at epoch {stopper.best_epoch})"
                )
            break

    if graphed:
        release_cuda_graphs(model)
    if cfg.restore_best and best_state is not None:
        model.load_state_dict(best_state)
        if progress and dist_info.is_main and stopper.best_epoch != len(history):
            print(f"the model keeps the weights of epoch {stopper.best_epoch}, the lowest "
                  "validation loss")
    # The epoch's loss can still be finite when the last step alone diverged.
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point()):
        raise _diverged(f"(the weights are not numbers after epoch {len(history)})", cfg)
    t_settle = time.perf_counter()
    settled = _settle_batchnorm(model, train_images, rows_on_device, per_rank_batch, cfg, device)
    if settled:
        sync(device)
        timings["BatchNorm"] = time.perf_counter() - t_settle
    if settled and progress and dist_info.is_main:
        print(f"BatchNorm statistics measured again on {settled} training images: their running "
              "averages had not settled (batchnorm.py)")
    best_epoch = stopper.best_epoch if cfg.restore_best else len(history)
    return FitResult(model, history, best_epoch, stopped_early, timings)


def _clear_for_resume(run_dir: Path) -> None:
    """Before a resume: remove what a process killed mid-write left (the checkpoint's, the
    metrics' or a plot's temporary file; the files themselves are whole, renamed into place),
    and say when there is no checkpoint to resume from."""
    for stray in [*run_dir.glob(".*.tmp"), *run_dir.glob("plots/.*.tmp")]:
        stray.unlink(missing_ok=True)
    if not (run_dir / CHECKPOINT).exists():
        print(f"--resume: no {CHECKPOINT} in {run_dir}; starting from epoch 1")


def _announce_start(cfg: TrainConfig, device: torch.device, how: str, n_train: int,
                    per_rank_batch: int, dist_info: DistInfo) -> None:
    """The lines above the first epoch: what trains where (``how``: compiled, CUDA graphs or
    ''), and what the user should know before it starts."""
    shard = n_train // dist_info.world_size
    print(f"training {cfg.model} at {cfg.image_size} px on {device}{how}: {describe_lr(cfg)}")
    if device.type == "cpu" and cfg.recipe in GPU_RECIPES and (
            work_224(cfg, n_train) >= CPU_HOURS_WORK_224):
        print(f"note: the {cfg.recipe} recipe is sized for a GPU; on a CPU it takes hours "
              "(--recipe cpu trains in minutes)")
    if dist_info.enabled:
        print(f"distributed: {dist_info.world_size} processes x batch {per_rank_batch} = "
              f"effective batch {per_rank_batch * dist_info.world_size}, lr {cfg.lr:g}")
    if shard < per_rank_batch:
        print(f"note: the batch of {per_rank_batch} is more than the {shard} training images"
              f"{' a process' if dist_info.enabled else ''}: every step takes all of them, "
              "one step an epoch")


def _restore(state: dict, model, optimizer, scheduler) -> tuple[EarlyStopping, dict | None,
                                                                  list[dict]]:
    """Put a checkpoint's weights and optimizer and schedule state back; return its early
    stopping state, best weights (when kept) and history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    stopper = EarlyStopping(**json.loads(state["early_stopping"]))
    return stopper, state.get("best_model"), json.loads(state["history"])


def _settle_batchnorm(model, train_images, rows, batch, cfg, device) -> int:
    """Re-measure BatchNorm's running statistics on the training ``rows`` where they had not
    settled (batchnorm.py); returns the images that took, 0 when none were needed."""
    n = len(rows)
    # Batches drawn across the training rows (which often come sorted by class), the same ones
    # in the same order on every rank, so the replicas stay identical.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    rows = rows[order.to(rows.device)]
    batch = min(batch, n)  # a data set smaller than the batch: all of it
    batches = (
        model_input(train_images[rows[i : i + batch]], cfg).contiguous(
            memory_format=torch.channels_last)
        for i in range(0, n - batch + 1, batch)
    ) if batch >= 2 else iter(())
    # Dropout while re-measuring draws from a stream of its own (epoch 0 is never trained), the
    # same on every rank: the replicas stay identical, and a resumed run ends as an
    # uninterrupted one.
    torch.manual_seed(stream_seed(cfg.seed, 0, 2, 0))
    with autocast(device):
        return settle_batchnorm(model, batches)


def _as_saved(model, train_images, rows, batch, cfg, device, val_images) -> nn.Module:
    """The model as training would save it now: where BatchNorm's running averages have not
    settled, a copy of it with them measured again as at the end of training (batchnorm.py),
    else the model itself.

    Unsettled averages give every image nearly the same answer (Keras' momentum keeps them so
    for hundreds of steps): a validation loss taken through them would choose the epoch and
    stop the run on figures the saved model never has.
    """
    if len(val_images) == 0 or unsettled_share(model) <= UNSETTLED_SHARE:
        return model
    measured = copy.deepcopy(model)
    release_cuda_graphs(measured)  # its own forward, not the original's captured graphs
    _settle_batchnorm(measured, train_images, rows, batch, cfg, device)
    return measured


def validation_figures(model, images, labels, cfg, device) -> dict:
    if len(images) == 0:
        return {}
    logits = predict_logits(model, images, cfg, device)
    return {
        "val_loss": float(F.cross_entropy(logits, labels)),
        "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def _diverged(how: str, cfg: TrainConfig) -> PneumoscanError:
    return PneumoscanError(f"training diverged {how}; lower --lr (now {cfg.lr:g}) and train "
                           "again into a new --out")


def _agree_on_resume(resuming: bool, run_dir: Path, dist_info: DistInfo,
                     device: torch.device) -> bool:
    """Every process resumes, or none: each reads the checkpoint from its own disk, and one that
    started afresh beside resumed ones would train other steps until the processes hung."""
    if not dist_info.enabled:
        return resuming
    seen = int(all_reduce_sum(torch.tensor([float(resuming)], device=device), dist_info).item())
    if 0 < seen < dist_info.world_size:
        here = "is there" if resuming else "is missing here, though there"
        raise PneumoscanError(
            f"--resume: {run_dir / CHECKPOINT} {here} for {seen} of {dist_info.world_size} "
            "processes; on several machines --out must be a folder they all share (or copy the "
            "run folder to each)")
    # Copies made at different times (one machine's older than another's) would resume from
    # different epochs, their collectives pairing one epoch's steps with another's.
    if resuming and len(set(gather_objects(_file_digest(run_dir / CHECKPOINT), dist_info))) > 1:
        raise PneumoscanError(
            f"--resume: the processes' {run_dir / CHECKPOINT} differ (copies made at different "
            "times?); copy the run folder of the machine with the latest to every machine")
    return resuming


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def seed_epoch(seed: int, epoch: int, rank: int, shuffle_gen: torch.Generator,
               augment_gen: torch.Generator) -> None:
    """Seed an epoch's random streams from (seed, epoch, rank) alone.

    The shuffle is the same on every rank, so the ranks' shards are disjoint; augmentation and
    dropout differ between ranks. Nothing random carries over from one epoch to the next, so a
    run resumed after any epoch, on the same kind of device and number of processes, draws
    exactly what an uninterrupted one draws (a GPU's generators give other streams than a
    CPU's for the same seed).
    """
    shuffle_gen.manual_seed(stream_seed(seed, epoch, 0))
    augment_gen.manual_seed(stream_seed(seed, epoch, 1, rank))
    torch.manual_seed(stream_seed(seed, epoch, 2, rank))  # dropout


def stream_seed(seed: int, *key: int) -> int:
    """A seed for the random stream named by ``key``, independent of every other key's."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0])


def _bar(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, "batch", enabled=enabled)


def _describe_time_left(epoch_walls: list[float], cfg: TrainConfig, epoch: int) -> str:
    """``"about 5 h 20 min left"``: where early stopping may end the run sooner, "at most"."""
    left = format_duration(time_left(epoch_walls, cfg.epochs - epoch))
    return f"at most {left} left" if cfg.early_stop_patience > 0 else f"about {left} left"


def _epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:3d}", f"loss {row['train_loss']:.4f}",
             f"acc {row['train_accuracy']:.4f}"]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
    parts += [f"{row['seconds']:.1f}s", f"{row['images_per_s']:.0f} img/s"]
    return "  ".join(parts)
