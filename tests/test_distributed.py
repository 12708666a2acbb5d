"""DistributedDataParallel through torchrun, on CPU with gloo: two processes, one set of outputs.

One ``torchrun --nproc_per_node=2`` launch runs a small driver (below) that first takes one
``TrainStep`` under DDP on a fixed batch split across the ranks, then runs the real
``pneumoscan train`` command line, recording each rank's final weights. The tests compare that
with a single-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan import cli
from pneumoscan.config import AugmentConfig, TrainConfig
from pneumoscan.data.synthetic import write_synthetic_dataset
from pneumoscan.train import METRICS, TrainStep, epoch_shard, make_optimizer, weighted_loss

SRC = Path(__file__).resolve().parents[1] / "src"
EPOCHS = 2
GLOBAL_BATCH = 16
TRAIN_ARGS = ["--recipe", "cpu", "--model", "seed_cnn", "--image-size", "32",
              "--epochs", str(EPOCHS), "--batch-size", str(GLOBAL_BATCH), "--device", "cpu",
              "--quiet"]

# Run by torchrun on every rank: argv is DUMP_DIR followed by the `pneumoscan` arguments.
DRIVER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import torch
    from torch import nn
    from pneumoscan import cli, pipeline
    from pneumoscan.config import AugmentConfig, TrainConfig
    from pneumoscan.distributed import init_distributed
    from pneumoscan.train import TrainStep, make_optimizer

    dump = Path(sys.argv[1])
    info = init_distributed("cpu")
    rank = info.rank

    # 1. One DDP step of a BatchNorm-free model, each rank on its half of one global batch.
    cfg = TrainConfig(in_chans=1, mean=0.5, std=0.25, lr=1e-3, optimizer="adamw",
                      weight_decay=0.05, device="cpu", compile=False,
                      augment=AugmentConfig(rotation_deg=0, zoom=0, shift=0))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 1, 1] * 4)
    weights = torch.tensor([2.0, 0.5])
    torch.manual_seed(rank)  # different on purpose: DDP must broadcast rank 0's initial weights
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(64, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        torch.save({"images": images, "labels": labels, "weights": weights,
                    "init": {k: v.clone() for k, v in model.state_dict().items()}},
                   dump / "step_inputs.pt")
    step = TrainStep(ddp, make_optimizer(model, cfg, torch.device("cpu")), None, cfg, weights,
                     torch.device("cpu"), torch.Generator())
    half = slice(rank * 8, rank * 8 + 8)
    loss, _ = step(images[half], labels[half])
    torch.save({"loss": loss, "params": dict(model.named_parameters()),
                "grads": {k: p.grad for k, p in model.named_parameters()}},
               dump / f"step_rank{rank}.pt")
    del step, ddp

    # 2. The real command line, recording every rank's final weights.
    real_fit = pipeline.fit

    def fit(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
                   dump / f"final_rank{rank}.pt")
        return result

    pipeline.fit = fit
    sys.exit(cli.main(sys.argv[2:]))
''')


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 for each torchrun rank
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A two-process torchrun run and a single-process run of the same data and global batch."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_synthetic_dataset(root / "data", n_train=72, n_test=12, size=32)
    (data / "train" / "NORMAL" / "damaged.png").write_bytes(b"not a PNG")  # skipped, said once
    dump = root / "dump"
    dump.mkdir()
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PNEUMOSCAN_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "driver.py"), str(dump),
           "train", "--data", str(data), "--out", str(root / "ddp_run"), *TRAIN_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    with pytest.MonkeyPatch.context() as mp:  # conftest's cache fixture is per test, not module
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        single_rc = cli.main(["train", "--data", str(data), "--out", str(root / "single_run"),
                              *TRAIN_ARGS])
    return {"proc": proc, "ddp": root / "ddp_run", "single": root / "single_run",
            "single_rc": single_rc, "dump": dump}


def _ok(runs: dict) -> subprocess.CompletedProcess:
    proc = runs["proc"]
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


# ---- sharding


@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (11, 2), (100, 3), (5, 4)])
def test_epoch_shard_disjoint_equal_and_covering(n, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [epoch_shard(perm, rank, world) for rank in range(world)]
    taken = torch.cat(shards)
    assert {len(s) for s in shards} == {n // world}  # same number of steps on every rank
    assert len(set(taken.tolist())) == len(taken)  # disjoint
    assert torch.equal(taken, perm[: len(taken)])  # the epoch, less under `world` images
    assert n - len(taken) < world


def test_epoch_shard_leaves_out_different_images_each_epoch():
    gen = torch.Generator().manual_seed(0)
    left_out = set()
    for _ in range(20):
        perm = torch.randperm(11, generator=gen)
        taken = torch.cat([epoch_shard(perm, r, 2) for r in range(2)])
        left_out |= set(range(11)) - set(taken.tolist())
    assert len(left_out) > 5  # the remainder is a fresh draw, not always the same image


# ---- the torchrun run


def test_torchrun_succeeds_with_one_set_of_outputs(runs):
    proc = _ok(runs)
    assert runs["single_rc"] == 0
    # Exactly the files a single-process run writes: no per-rank copies.
    assert _files(runs["ddp"]) == _files(runs["single"])
    assert {"model.safetensors", "model.json", "config.json", METRICS} <= _files(runs["ddp"])
    config = json.loads((runs["ddp"] / "config.json").read_text())
    assert config["environment"]["processes"] == 2
    rows = _metrics(runs["ddp"])
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    # Only rank 0 speaks.
    assert proc.stdout.count("validation (threshold") == 1
    assert proc.stdout.count("data: ") == 1
    assert proc.stderr.count("damaged.png") == 1  # the unreadable file: named by rank 0 alone
    assert "distributed: 2 processes x batch 8 = effective batch 16" in proc.stdout


def test_ranks_end_with_identical_weights(runs):
    _ok(runs)
    final = [torch.load(runs["dump"] / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    params = [k for k in final[0] if "running_" not in k and "num_batches" not in k]
    assert len(params) > 10
    for k in params:
        assert torch.equal(final[0][k], final[1][k]), k
    # BatchNorm running statistics are the one thing a rank keeps of its own between the
    # broadcasts DDP makes from rank 0 at each forward; rank 0's are the ones saved.
    from safetensors.torch import load_file

    saved = load_file(runs["ddp"] / "model.safetensors")
    for k in params:
        assert torch.equal(saved[k], final[0][k]), k


def test_ddp_step_equals_single_process_step_on_the_global_batch(runs):
    _ok(runs)
    inputs = torch.load(runs["dump"] / "step_inputs.pt", weights_only=True)
    ranks = [torch.load(runs["dump"] / f"step_rank{r}.pt", weights_only=True) for r in (0, 1)]

    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(64, 2))
    model.load_state_dict(inputs["init"])
    cfg = TrainConfig(in_chans=1, mean=0.5, std=0.25, lr=1e-3, optimizer="adamw",
                      weight_decay=0.05, device="cpu", compile=False,
                      augment=AugmentConfig(rotation_deg=0, zoom=0, shift=0))
    step = TrainStep(model, make_optimizer(model, cfg, torch.device("cpu")), None, cfg,
                     inputs["weights"], torch.device("cpu"), torch.Generator())
    loss, _ = step(inputs["images"], inputs["labels"])

    # Equal halves: the mean of the ranks' batch means is the global batch mean.
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(loss.item(), rel=1e-6)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"].item(), rel=1e-3)
    for name, p in model.named_parameters():
        for r in ranks:  # averaged (not summed) gradients, then the same update on every rank
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-5, atol=1e-8)
    # Sanity of the reference itself: the per-image weighted loss over all 16 images.
    logits = model(((inputs["images"][:, None].float() / 255) - 0.5) / 0.25)
    assert weighted_loss(logits, inputs["labels"], inputs["weights"], 0.1).item() != 0


def test_torchrun_result_close_to_single_process(runs):
    _ok(runs)
    ddp, single = _metrics(runs["ddp"]), _metrics(runs["single"])
    # Same global batch, same shuffle and learning-rate schedule: the runs see the same number of
    # images and steps. BatchNorm statistics and augmentation draws differ per rank, so the
    # figures agree loosely, not exactly.
    for a, b in zip(ddp, single, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert abs(a["train_loss"] - b["train_loss"]) < 0.25, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) < 0.15, (a, b)
        assert np.isfinite([a["train_loss"], a["val_loss"]]).all()


@pytest.mark.parametrize("seen, refused", [(0, False), (1, True), (2, False)])
def test_every_process_resumes_or_none(seen, refused, monkeypatch, tmp_path):
    """On several machines each process reads the checkpoint from its own disk: one that started
    afresh beside resumed ones would have trained other steps until the processes hung."""
    from pneumoscan import train
    from pneumoscan.distributed import DistInfo
    from pneumoscan.errors import PneumoscanError

    info = DistInfo(rank=0, local_rank=0, world_size=2)
    monkeypatch.setattr(train, "all_reduce_sum", lambda t, _info: t.fill_(seen))
    (tmp_path / train.CHECKPOINT).write_bytes(b"state")
    monkeypatch.setattr(train, "gather_objects", lambda obj, _info: [obj, obj])
    if refused:
        with pytest.raises(PneumoscanError, match="is there for 1 of 2 processes"):
            train._agree_on_resume(True, tmp_path, info, torch.device("cpu"))
        # Said as it is on the machine without it.
        with pytest.raises(PneumoscanError, match="is missing here, though there for 1 of 2"):
            train._agree_on_resume(False, tmp_path, info, torch.device("cpu"))
    else:
        assert train._agree_on_resume(seen == 2, tmp_path, info, torch.device("cpu")) == (seen == 2)
    if seen == 2:
        # A machine's older copy: the processes would resume from different epochs.
        monkeypatch.setattr(train, "gather_objects", lambda obj, _info: [obj, "another"])
        with pytest.raises(PneumoscanError, match="differ"):
            train._agree_on_resume(True, tmp_path, info, torch.device("cpu"))


# ---- several machines, each with its own --data and --out: what differs is refused by all


def _two_machines(tmp_path: Path, args_a: list[str], args_b: list[str]) -> list:
    """Two processes joined as torchrun joins two machines' (RANK 0 and 1, each LOCAL_RANK 0),
    each running `pneumoscan train` with its own arguments: (exit status, stderr) of each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate((args_a, args_b)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": "0", "PNEUMOSCAN_CACHE": str(tmp_path / f"cache{rank}"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC),
                                                           os.environ.get("PYTHONPATH")]))}
        procs.append(subprocess.Popen([sys.executable, "-m", "pneumoscan", "train", *args,
                                       *TRAIN_ARGS[:-5], "--epochs", "1", "--device", "cpu",
                                       "--val-fraction", "0.25", "--quiet"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)  # a hang would be torch's 30 minutes
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the processes hung instead of stopping")
        results.append((proc.returncode, err))
    return results


@pytest.mark.slow
def test_machines_with_different_data_are_refused_by_both(tmp_path):
    """Each rank carved its own validation from its own files (21 of 24 of rank 0's validation
    images were rank 1's training images), and a run was written; with other step counts the
    ranks hung for 30 minutes."""
    a = write_synthetic_dataset(tmp_path / "a", n_train=40, n_test=4, size=32)
    b = Path(shutil.copytree(a, tmp_path / "b"))
    extra = sorted((b / "train" / "NORMAL").iterdir())[0]
    shutil.copy(extra, extra.with_name("extra.png"))
    results = _two_machines(tmp_path, ["--data", str(a), "--out", str(tmp_path / "ra")],
                            ["--data", str(b), "--out", str(tmp_path / "rb")])
    for status, err in results:
        assert status == 2 and "the processes' data differ" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "ra" / "model.json").exists()
    # The same files, another --seed on one machine: other validation images and batches.
    results = _two_machines(tmp_path, ["--data", str(a), "--out", str(tmp_path / "sa")],
                            ["--data", str(a), "--out", str(tmp_path / "sb"), "--seed", "1"])
    for status, err in results:
        assert status == 2 and "the processes' data differ" in err, err
    results = _two_machines(tmp_path, ["--data", str(a), "--out", str(tmp_path / "ea")],
                            ["--data", str(a), "--out", str(tmp_path / "eb"), "--lr", "0.01"])
    for status, err in results:
        assert status == 2 and "the processes' settings: lr differ" in err, err


@pytest.mark.slow
def test_a_machine_that_refuses_to_start_stops_the_other_at_once(tmp_path):
    """One machine's --out held a finished run: it refused in one line, and the other waited
    30 minutes in silence for it to join."""
    data = write_synthetic_dataset(tmp_path / "data", n_train=40, n_test=4, size=32)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.json").write_text("{}")
    (status_a, err_a), (status_b, err_b) = _two_machines(
        tmp_path, ["--data", str(data), "--out", str(tmp_path / "ra")],
        ["--data", str(data), "--out", str(taken)])
    assert status_b == 2 and "already holds" in err_b, err_b
    assert status_a == 2 and "1 of the 2 processes stopped before training" in err_a, err_a
    assert "Traceback" not in err_a + err_b


def test_commands_other_than_train_refuse_torchrun(monkeypatch, capsys, tmp_path):
    """cv under torchrun ran the whole cross-validation in every process, all writing one
    folder (with two machines' data, a mixed run)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["cv", "--data", str(tmp_path), "--folds", "2", "--out",
                     str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err
    assert "cv runs as one process: start it without torchrun" in err
    assert not (tmp_path / "cv").exists()


def test_a_process_that_lost_its_peers_says_so_in_one_line(monkeypatch, capsys):
    """A survivor printed gloo's 20-line traceback ("Connection closed by peer ... GLHF!")."""
    import pneumoscan.commands.train as train_command
    import pneumoscan.distributed  # noqa: F401  (imported by any command that trains)

    def lost(_args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                           "closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(train_command, "run", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another process of this torchrun stopped" in err
    monkeypatch.delenv("WORLD_SIZE")  # without torchrun it is no such thing: raised as it is
    with pytest.raises(RuntimeError):
        cli.main(["train", "--out", "x"])
