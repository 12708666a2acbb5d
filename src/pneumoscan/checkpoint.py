"""A training run's checkpoint: everything needed to continue it exactly, and the checks that
refuse a resume which would go on differently."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch

from pneumoscan.config import TrainConfig
from pneumoscan.data.dataset import data_changed
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import atomic_write

# Seconds between checkpoints. On a GPU an epoch of these data sets takes under a second while
# writing ResNet-18 with its optimizer state (135 MB, flushed to disk) takes longer: there a
# checkpoint is written once this many seconds have passed, and after the last epoch. On the CPU,
# where an epoch takes far longer than its checkpoint, after every epoch.
CHECKPOINT_INTERVAL_S = {"cpu": 0.0, "cuda": 30.0}


def save_checkpoint(
    path: Path, *, cfg: TrainConfig, epoch: int, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, scheduler, stopper, best_state: dict | None,
    history: list[dict], data_fingerprint: str, steps_per_epoch: int, processes: int,
    validation: str = "",
) -> None:
    """Everything needed to continue exactly where this epoch ended, written atomically.
    ``validation``: the validation split's identity (``dataset.split_identity``)."""
    state = {
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "early_stopping": json.dumps(stopper.__dict__),
        "history": json.dumps(history),
        "data_fingerprint": data_fingerprint,
        "steps_per_epoch": steps_per_epoch,
        "processes": processes,
        "validation": validation,
    }
    if best_state is not None:
        state["best_model"] = best_state
    atomic_write(path, lambda tmp: _save(state, tmp))


def _save(state: dict, path: Path) -> None:
    """torch.save, with a full disk reported as the OSError that names the file in one line, and
    Ctrl-C as the interrupt it is: torch's writer turns either into a RuntimeError ("unexpected
    pos") as it closes the file on it."""
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(state, writer)
        except RuntimeError as e:
            if writer.error is not None:
                raise writer.error from None
            if isinstance(e.__context__, KeyboardInterrupt):
                raise e.__context__ from None
            raise


class _RecordingWriter:
    """A file's write() and flush() that remember the OSError they met."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        return self._recorded(self.f.write, data)

    def flush(self) -> None:
        self._recorded(self.f.flush)

    def _recorded(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            self.error = e
            raise


_CHECKPOINT_KEYS = ("config", "epoch", "model", "optimizer", "scheduler", "early_stopping",
                    "history")
# Settings a run may resume with changed: where it runs and how fast, not what it computes.
# The data are compared by their fingerprint, so a moved folder or another spelling resumes.
# --pretrained only decides the weights before epoch 1: a resume takes them from the checkpoint.
_FREE_ON_RESUME = ("out", "data", "device", "compile", "cuda_graphs", "low_memory", "pretrained")


def load_checkpoint(path: Path, cfg: TrainConfig, data_fingerprint: str = "",
                    steps_per_epoch: int | None = None, processes: int = 1,
                    validation: str = "") -> dict:
    """Resume state, loaded with weights_only=True so a planted pickle cannot run code.

    Refused when the run would go on differently: other settings, other data, other
    validation patients (carved otherwise by another version), another number of processes
    (each trains its own shard), or another number of steps an epoch (compiled and graphed
    runs leave out the last partial batch).
    """
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise for a user
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's messages advise weights_only=False: not for users
        raise PneumoscanError(
            f"{path}: refused to load checkpoint: corrupt, or holds Python objects other than "
            "tensors and plain data (which could run code); delete it or use a new --out"
        ) from None
    except Exception as e:  # unpickling errors come in many types; none may run code
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise PneumoscanError(
            f"{path}: not a readable checkpoint ({type(e).__name__}{': ' if reason else ''}"
            f"{reason}); delete it or use a new --out"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    try:
        saved = json.loads(state["config"]) if not missing else None
    except (TypeError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise PneumoscanError(
            f"{path}: not a pneumoscan checkpoint (missing or bad "
            f"{', '.join(missing) or 'config'}); delete it or use a new --out"
        )
    current = cfg.to_dict()
    defaults = TrainConfig().to_dict()  # a field newer than the checkpoint had its default
    changed = [k for k in current if k not in _FREE_ON_RESUME
               and saved.get(k, defaults[k]) != current[k]]
    if changed:
        raise PneumoscanError(
            f"{path}: --resume with different settings ({', '.join(changed)}); "
            "resume with the run's own config or start a new --out"
        )
    if data_changed(state.get("data_fingerprint"), data_fingerprint):
        raise PneumoscanError(
            f"{path}: --resume on other data than the run started with (the images differ); "
            "resume with its own --data or start a new --out"
        )
    saved_validation = state.get("validation")
    if validation and saved_validation and saved_validation != validation:
        raise PneumoscanError(
            f"{path}: --resume would select on other validation patients than the run started "
            "with (this version of pneumoscan or scikit-learn chooses them otherwise); start a "
            "new --out"
        )
    saved_processes = state.get("processes", 1)
    if saved_processes != processes:
        raise PneumoscanError(
            f"{path}: --resume in {processes} process(es) where the run had {saved_processes}; "
            "resume with the torchrun --nproc_per_node (and --nnodes) it started with"
        )
    saved_steps = state.get("steps_per_epoch")
    if steps_per_epoch is not None and saved_steps is not None and saved_steps != steps_per_epoch:
        raise PneumoscanError(
            f"{path}: --resume would take {steps_per_epoch} steps an epoch where the run took "
            f"{saved_steps} (compiled and CUDA-graphed runs leave out the last partial batch); "
            "resume with the --device, --compile and --cuda-graphs it started with"
        )
    return state
