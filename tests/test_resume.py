"""Nothing lost: a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted one
does.

Each scenario trains for real in a subprocess (`python -m pneumoscan train`), kills it with
SIGKILL, resumes it with `--resume`, and compares every tensor of model.safetensors, every figure
of metrics.jsonl (timings aside) and model.json's threshold and temperature with an uninterrupted
run of the same settings. Torch runs single-threaded in every run, so the kernels are the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.cli import main
from pneumoscan.data.dataset import FILES_FINGERPRINT as FILES
from pneumoscan.data.dataset import Split
from pneumoscan.data.synthetic import write_synthetic_dataset

SRC = Path(__file__).resolve().parents[1] / "src"
EPOCHS = 3
KILL_AFTER = 1  # epochs finished (checkpointed) before the kill
TIMEOUT_S = 240
# seed_cnn at 32 px, 54 training images in batches of 16: four steps an epoch.
COMMON = ["--model", "seed_cnn", "--image-size", "32", "--epochs", str(EPOCHS),
          "--batch-size", "16", "--seed", "3", "--device", "cpu", "--quiet"]
RECIPES = {
    "cpu": ["--recipe", "cpu"],  # AdamW + one-cycle, last weights
    "seed": ["--recipe", "seed"],  # Adam, early stopping state, best weights restored
}
TIMING = ("seconds", "images_per_s")

# Runs the CLI with torch.save patched so that the Nth call writes half a checkpoint to its
# temporary file and the process then SIGKILLs itself: a crash in the middle of a write.
KILL_IN_WRITE = """
import io, os, signal, sys, torch
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_SAVE"]):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):  # the project hands torch.save a file, not a path
            f.write(half)
            f.flush()
        else:
            with open(f, "wb") as fh:
                fh.write(half)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from pneumoscan.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("resume-data"), n_train=60, n_test=6, size=32
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.getbasetemp() / "cache"
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PNEUMOSCAN_CACHE": str(cache),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_argv(data: Path, out: Path, recipe: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *RECIPES[recipe], *COMMON, *extra]


def start(argv: list[str], env: dict, script: str | None = None) -> subprocess.Popen:
    prefix = [sys.executable, "-c", script] if script else [sys.executable, "-m", "pneumoscan"]
    return subprocess.Popen(prefix + argv, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training did not finish in {TIMEOUT_S} s:\n{err[-2000:]}")
    return proc.returncode, out, err


def run_ok(argv: list[str], env: dict, script: str | None = None) -> str:
    status, out, err = finish(start(argv, env, script))
    assert status == 0, err[-3000:]
    assert "Traceback" not in err
    return out


def metric_lines(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_after_epochs(proc: subprocess.Popen, run: Path, epochs: int) -> None:
    """SIGKILL the run once metrics.jsonl shows ``epochs`` epochs: mid-way through the next."""
    deadline = time.monotonic() + TIMEOUT_S
    while metric_lines(run) < epochs:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training made no progress")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def checkpoint_epoch(run: Path) -> int:
    return int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"])


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def figures(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ[:5]}"
    assert figures(resumed) == figures(reference)
    assert len(figures(resumed)) == EPOCHS
    meta_a = json.loads((resumed / "model.json").read_text())
    meta_b = json.loads((reference / "model.json").read_text())
    for key in ("threshold", "temperature", "validation", "epochs_trained"):
        assert meta_a[key] == meta_b[key], key
    test_a = json.loads((resumed / "test_metrics.json").read_text())
    assert test_a == json.loads((reference / "test_metrics.json").read_text())


@pytest.fixture(scope="module")
def reference_runs(data_dir, env, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per recipe, the two trained side by side."""
    root = tmp_path_factory.mktemp("reference")
    runs = {recipe: root / recipe for recipe in RECIPES}
    procs = [start(train_argv(data_dir, out, recipe), env) for recipe, out in runs.items()]
    for proc in procs:
        status, _, err = finish(proc)
        assert status == 0, err[-3000:]
    return runs


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(
    recipe, data_dir, env, reference_runs, tmp_path
):
    run = tmp_path / "run"
    # --resume with nothing to resume starts afresh, and says so.
    proc = start(train_argv(data_dir, run, recipe, "--resume"), env)
    kill_after_epochs(proc, run, KILL_AFTER)
    done = checkpoint_epoch(run)
    assert KILL_AFTER <= done < EPOCHS, "the kill came too late to interrupt anything"
    assert metric_lines(run) <= done  # the checkpoint is written before metrics.jsonl
    assert not (run / "model.safetensors").exists()

    out = run_ok(train_argv(data_dir, run, recipe, "--resume"), env)
    assert f"resuming {run} after epoch {done}" in out
    assert_same_run(run, reference_runs[recipe])


def test_sigkill_while_writing_checkpoint_keeps_the_previous_one(
    data_dir, env, reference_runs, tmp_path
):
    run = tmp_path / "run"
    # The second torch.save is epoch 2's checkpoint: killed half-way through writing it.
    killed = start(train_argv(data_dir, run, "cpu"), {**env, "KILL_AT_SAVE": "2"},
                   script=KILL_IN_WRITE)
    status, out, err = finish(killed)
    assert status == -signal.SIGKILL, err[-2000:]
    assert checkpoint_epoch(run) == 1  # whole, loadable, and the last good one
    assert metric_lines(run) == 1
    strays = list(run.glob(".checkpoint.pt.*.tmp"))
    assert len(strays) == 1 and 0 < strays[0].stat().st_size

    out = run_ok(train_argv(data_dir, run, "cpu", "--resume"), env)
    assert f"resuming {run} after epoch 1" in out
    assert not list(run.glob(".*.tmp")), "resume leaves no stray temporary files"
    assert_same_run(run, reference_runs["cpu"])


def test_resume_refuses_different_settings(reference_runs, data_dir, capsys):
    run = reference_runs["cpu"]
    before = (run / "checkpoint.pt").read_bytes()
    for extra, named in ((["--lr", "0.5"], "lr"), (["--epochs", "5"], "epochs")):
        # argparse keeps the last value given, so ``extra`` overrides COMMON.
        assert main(train_argv(data_dir, run, "cpu", "--resume", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "checkpoint.pt" in err and "different settings" in err and named in err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_after_early_stop_trains_no_further(tmp_path):
    """A resumed run that had already stopped early must not add an epoch."""
    from pneumoscan.config import TrainConfig
    from pneumoscan.train import fit

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(images=rng.integers(0, 255, (n, 32, 32), dtype=np.uint8),
                     labels=np.arange(n) % 2, patients=[str(i) for i in range(n)],
                     paths=[str(i) for i in range(n)])

    train, val = split(8), split(4)
    # min_delta 10: only the first epoch counts as an improvement, so the run stops after 2.
    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=6, batch_size=4, device="cpu",
                      early_stop_patience=1, early_stop_min_delta=10.0, out=str(tmp_path))
    first = fit(cfg, train, val, tmp_path, class_counts=np.array([4, 4]), progress=False)
    assert first.stopped_early and len(first.history) == 2
    # What a kill mid-write leaves: --resume clears it, in the run folder and in plots/ alike.
    (tmp_path / "plots").mkdir(exist_ok=True)
    strays = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / "plots" / ".roc.png.x1.tmp"]
    for stray in strays:
        stray.write_bytes(b"half")
    again = fit(cfg, train, val, tmp_path, class_counts=np.array([4, 4]), resume=True,
                progress=False)
    assert again.stopped_early and again.history == first.history
    assert not any(stray.exists() for stray in strays)
    assert again.best_epoch == first.best_epoch == 1
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def _checkpointed_run(tmp_path: Path, epochs: int = 2):
    """A two-epoch fit() run left with its checkpoint, and what resuming it needs."""
    from pneumoscan.config import TrainConfig
    from pneumoscan.train import fit

    rng = np.random.default_rng(0)
    train = Split(images=rng.integers(0, 255, (12, 32, 32), dtype=np.uint8),
                  labels=np.arange(12) % 2, patients=[str(i) for i in range(12)],
                  paths=[str(i) for i in range(12)])
    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=epochs, batch_size=5,
                      device="cpu", early_stop_patience=0, out=str(tmp_path))
    fit(cfg, train, train, tmp_path, class_counts=np.array([6, 6]), progress=False,
        data_fingerprint=FILES + "abc")
    return cfg


def test_resume_follows_the_run_folder_and_the_data_not_their_spelling(tmp_path):
    """--out and --data may be spelled otherwise (another working directory, a moved folder);
    what is refused is other images, or another number of steps an epoch."""
    import dataclasses

    from pneumoscan.checkpoint import load_checkpoint
    from pneumoscan.errors import PneumoscanError

    cfg = _checkpointed_run(tmp_path)
    moved = dataclasses.replace(cfg, out="elsewhere/run", data="/somewhere/else")
    # 12 images in batches of 5: 3 steps an epoch (the last one partial).
    assert load_checkpoint(tmp_path / "checkpoint.pt", moved, FILES + "abc", 3)["epoch"] == 2
    with pytest.raises(PneumoscanError, match="other data"):
        load_checkpoint(tmp_path / "checkpoint.pt", moved, FILES + "xyz", 3)
    # Compiled or CUDA-graphed, the partial batch is left out: 2 steps, and the one-cycle
    # schedule restored from the checkpoint would run past its end.
    with pytest.raises(PneumoscanError, match="2 steps an epoch where the run took 3"):
        load_checkpoint(tmp_path / "checkpoint.pt", moved, FILES + "abc", 2)
    # Under torchrun with two processes each would train another shard.
    with pytest.raises(PneumoscanError, match="in 2 process.* where the run had 1"):
        load_checkpoint(tmp_path / "checkpoint.pt", moved, FILES + "abc", 3, processes=2)


def test_a_resume_validating_on_other_patients_is_refused(tmp_path):
    """The same files carved otherwise (another scikit-learn; a given val/ now refused for
    sharing patients) resumed on another split, or was refused only by chance, as another
    number of steps an epoch."""
    from pneumoscan.checkpoint import load_checkpoint
    from pneumoscan.data.dataset import split_identity
    from pneumoscan.errors import PneumoscanError

    cfg = _checkpointed_run(tmp_path)
    path = tmp_path / "checkpoint.pt"
    same = Split(images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 1]),
                 patients=[str(i) for i in reversed(range(12))], paths=["a", "b"])
    assert load_checkpoint(path, cfg, FILES + "abc", 3, validation=split_identity(same))
    other = Split(images=same.images, labels=same.labels, patients=["0", "1"], paths=["a", "b"])
    with pytest.raises(PneumoscanError, match="other validation patients"):
        load_checkpoint(path, cfg, FILES + "abc", 3, validation=split_identity(other))
    # A checkpoint from before the split was recorded resumes as it did.
    state = torch.load(path, weights_only=True)
    del state["validation"]
    torch.save(state, path)
    assert load_checkpoint(path, cfg, FILES + "abc", 3, validation=split_identity(other))


def test_every_epochs_random_streams_follow_from_seed_epoch_and_rank():
    """Nothing random is carried between epochs: a resume draws what an uninterrupted run
    draws; the shuffle is shared by the ranks, augmentation and dropout are not."""
    from pneumoscan.train import seed_epoch

    def streams(seed, epoch, rank):
        shuffle, augment = torch.Generator(), torch.Generator()
        torch.rand(5)  # whatever happened before must not matter
        seed_epoch(seed, epoch, rank, shuffle, augment)
        return (torch.randperm(20, generator=shuffle), torch.rand(4, generator=augment),
                torch.rand(4))

    a = streams(0, 3, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, streams(0, 3, 0), strict=True))
    rank1 = streams(0, 3, 1)
    assert torch.equal(a[0], rank1[0])  # the same shuffle on every rank: disjoint shards
    assert not torch.equal(a[1], rank1[1]) and not torch.equal(a[2], rank1[2])
    for other in (streams(0, 4, 0), streams(1, 3, 0)):
        assert not any(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_a_diverged_training_stops_with_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    status = main(["train", "--data", str(data_dir), "--out", str(out), *RECIPES["seed"],
                   *COMMON, "--epochs", "1", "--lr", "1e30"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "diverged in epoch 1" in err and "--lr" in err


def test_sigterm_ends_a_run_as_ctrl_c_does_and_it_resumes(data_dir, env, tmp_path):
    """SIGTERM (a job scheduler's, or torchrun's when it is stopped) ended the process without
    a word: no "--resume continues" line, and an exit status that said nothing."""
    run = tmp_path / "run"
    proc = start(train_argv(data_dir, run, "cpu", "--epochs", "30"), env)
    deadline = time.monotonic() + TIMEOUT_S
    while metric_lines(run) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training made no progress:\n{proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "pneumoscan train: terminated; the same command with --resume continues from the last "
        "checkpoint"), err
    assert "Traceback" not in err and (run / "checkpoint.pt").is_file()
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["train", "cv"])
def test_model_json_is_written_last_so_a_stopped_run_is_not_taken_for_finished(
        command, synthetic_data, tmp_path, monkeypatch):
    """Stopped as model.json would be written: everything a finished run holds besides (its
    digests of training images, its test figures) is already there, and no model.json says
    finished. Before, model.json came first: a run stopped after it looked finished, yet
    evaluate could no longer tell its training images."""
    import pneumoscan.cv as cv_module
    import pneumoscan.pipeline as pipeline_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if command == "train":
        monkeypatch.setattr(pipeline_module, "save_model", stop)
    else:
        monkeypatch.setattr(cv_module, "save_meta", stop)
    out = tmp_path / "run"
    argv = [command, "--data", str(synthetic_data), "--out", str(out), "--recipe", "cpu",
            "--model", "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet"]
    assert main(argv + (["--folds", "2"] if command == "cv" else [])) == 130
    assert (out / "test_metrics.json").is_file() and not (out / "model.json").exists()
    if command == "train":
        assert (out / "training_images.npz").is_file()
    else:
        assert all((out / f"fold-{k}" / "training_images.npz").is_file() for k in (0, 1))
