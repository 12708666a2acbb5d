"""Large batches and the GPU fast path's decisions: learning-rate scaling and warm-up, when to
compile or capture CUDA graphs, how often to checkpoint, evaluation batch sizes.

The CUDA-only mechanics themselves (graph capture and replay, bf16) are measured on a GPU by
``benchmarks/gpu_check.sh``; here, everything that decides what runs is pinned down on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pneumoscan import train as train_module
from pneumoscan.cli import main
from pneumoscan.config import RECIPES, AugmentConfig, TrainConfig, build_config, describe_lr
from pneumoscan.data.dataset import Split
from pneumoscan.device import should_compile, should_graph
from pneumoscan.distributed import DistInfo
from pneumoscan.errors import PneumoscanError
from pneumoscan.preprocess import EVAL_PIXELS_PER_BATCH, GPU_EVAL_FACTOR, eval_batch_size
from pneumoscan.train import (
    CHECKPOINT,
    METRICS,
    fit,
    make_optimizer,
    make_scheduler,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# ---- learning rate for a batch other than the recipe's


@pytest.mark.parametrize("recipe", ["strong", "cpu", "seed"])
@pytest.mark.parametrize("factor", [0.5, 4, 8])
def test_changed_batch_scales_the_recipe_lr_by_the_square_root(recipe, factor):
    base = RECIPES[recipe]
    batch = int(base["batch_size"] * factor)
    cfg = build_config(recipe, "cpu", {"batch_size": batch})
    assert cfg.lr == pytest.approx(base["lr"] * math.sqrt(factor))
    assert cfg.batch_size == batch


def test_given_lr_is_used_as_it_is():
    cfg = build_config("strong", "cpu", {"batch_size": 512, "lr": 1e-3})
    assert cfg.lr == 1e-3 and cfg.warmup_epochs == 0
    assert describe_lr(cfg) == "batch 512, lr 0.001 (as given)"


def test_recipe_batch_keeps_the_recipe_lr():
    cfg = build_config("seed", "cpu", {})
    assert cfg.lr == RECIPES["seed"]["lr"] and cfg.warmup_epochs == 0
    assert describe_lr(cfg) == "batch 32, lr 0.001 (the seed recipe's)"


def test_constant_schedule_gets_a_warm_up_only_when_the_rate_rises():
    larger = build_config("seed", "cpu", {"batch_size": 256})
    assert larger.schedule == "constant" and larger.warmup_epochs > 0
    assert "scaled by the square root" in describe_lr(larger) and "warm-up" in describe_lr(larger)
    smaller = build_config("seed", "cpu", {"batch_size": 16})
    assert smaller.lr < RECIPES["seed"]["lr"] and smaller.warmup_epochs == 0
    # One-cycle recipes warm up already: nothing is added.
    assert build_config("strong", "cpu", {"batch_size": 256}).warmup_epochs == 0


def test_constant_schedule_warm_up_is_linear_then_flat():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.1, schedule="constant", warmup_epochs=2, device="cpu")
    optimizer = make_optimizer(model, cfg, CPU)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=5)  # 10 warm-up steps
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:10] == pytest.approx([0.1 * (k + 1) / 10 for k in range(10)])
    assert rates[10:] == pytest.approx([0.1] * 4)
    assert make_scheduler(optimizer, dataclasses.replace(cfg, warmup_epochs=0), 5) is None


# ---- what runs on a GPU


def test_compile_only_pays_for_long_runs():
    strong = build_config("strong", "cuda", {})
    assert not should_compile(strong, CUDA, 4_694)  # 15 epochs: warm-up would dominate
    assert should_compile(dataclasses.replace(strong, epochs=500), CUDA, 4_694)
    assert not should_compile(dataclasses.replace(strong, epochs=500), CPU, 4_694)
    # Smaller images are less work per image.
    small = dataclasses.replace(strong, epochs=500, image_size=64)
    assert not should_compile(small, CUDA, 4_694)
    assert should_compile(dataclasses.replace(strong, compile=True), CPU, 10)


def test_cuda_graphs_only_for_uncompiled_single_process_gpu_runs():
    cfg = TrainConfig()
    single, ddp = DistInfo(), DistInfo(rank=0, local_rank=0, world_size=2)
    assert ddp.enabled and not single.enabled
    assert should_graph(cfg, CUDA, single, False, 64, 4_000)
    assert not should_graph(cfg, CPU, single, False, 64, 4_000)
    assert not should_graph(cfg, CUDA, single, True, 64, 4_000)  # compiled
    assert not should_graph(cfg, CUDA, ddp, False, 64, 4_000)
    assert not should_graph(cfg, CUDA, single, False, 64, 40)  # not one full batch
    assert not should_graph(dataclasses.replace(cfg, cuda_graphs=False), CUDA, single, False,
                             64, 4_000)
    for device, dist in ((CPU, single), (CUDA, ddp)):
        with pytest.raises(PneumoscanError, match="--cuda-graphs needs a CUDA GPU"):
            should_graph(dataclasses.replace(cfg, cuda_graphs=True), device, dist, False, 64,
                          4_000)


def test_cuda_graphs_on_cpu_is_one_clear_line(synthetic_data, tmp_path, capsys):
    code = main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--cuda-graphs", "--image-size", "32", "--epochs", "1",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cuda-graphs needs a CUDA GPU" in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()  # refused before any image was decoded


def test_gpu_evaluation_batches_are_larger_and_still_pixel_bounded():
    for size in (32, 96, 224, 512):
        cpu, gpu = eval_batch_size(size), eval_batch_size(size, device_type="cuda")
        assert gpu >= cpu and gpu * size * size <= max(
            GPU_EVAL_FACTOR * EVAL_PIXELS_PER_BATCH, size * size)
    assert eval_batch_size(224, device_type="cuda") == GPU_EVAL_FACTOR * eval_batch_size(224)


# ---- checkpoint cadence


def _split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) % 3 != 0).astype(np.int64)
    return Split(images, labels, [f"p{i}" for i in range(n)], [f"{i}.png" for i in range(n)])


def _fit(tmp_path, epochs=3):
    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=epochs, batch_size=8,
                      device="cpu", augment=AugmentConfig(0, 0, 0), compile=False,
                      early_stop_patience=0, restore_best=False)
    return fit(cfg, _split(24, 1), _split(8, 2), tmp_path, class_counts=np.array([8, 16]),
               progress=False)


def _count_saves(monkeypatch) -> list[int]:
    epochs: list[int] = []
    real = train_module.save_checkpoint

    def counting(path, **fields):
        epochs.append(fields["epoch"])
        return real(path, **fields)

    monkeypatch.setattr(train_module, "save_checkpoint", counting)
    return epochs


def test_checkpoint_after_every_epoch_on_cpu(tmp_path, monkeypatch):
    saved = _count_saves(monkeypatch)
    _fit(tmp_path)
    assert saved == [1, 2, 3]


def test_checkpoint_interval_keeps_the_last_epoch(tmp_path, monkeypatch):
    # As on a GPU, where epochs are shorter than the interval: only the last epoch is written,
    # while metrics.jsonl still has every epoch.
    monkeypatch.setitem(train_module.CHECKPOINT_INTERVAL_S, "cpu", 3600.0)
    saved = _count_saves(monkeypatch)
    _fit(tmp_path)
    assert saved == [3]
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 3 and len(json.loads(state["history"])) == 3
    assert len((tmp_path / METRICS).read_text().splitlines()) == 3


def test_resume_accepts_a_checkpoint_from_before_newer_settings(tmp_path, monkeypatch):
    # A checkpoint written before a field existed: the field's default counts as what it had.
    _fit(tmp_path, epochs=2)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    config = json.loads(state["config"])
    for newer in ("warmup_epochs", "cuda_graphs"):
        config.pop(newer)
    state["config"] = json.dumps(config)
    torch.save(state, tmp_path / CHECKPOINT)
    cfg = TrainConfig.from_dict(config)
    assert train_module.load_checkpoint(tmp_path / CHECKPOINT, cfg)["epoch"] == 2
    with pytest.raises(PneumoscanError, match="warmup_epochs"):
        train_module.load_checkpoint(tmp_path / CHECKPOINT,
                                     dataclasses.replace(cfg, warmup_epochs=1.0))


# ---- low-memory mode


def test_low_memory_mode_switches_glibc_allocator():
    import platform

    from pneumoscan.allocator import return_large_buffers

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert return_large_buffers() is True


def test_low_memory_without_glibc_says_what_it_still_does(monkeypatch, capsys):
    # macOS and Windows have no mallopt; the report's CNN still recomputes its stem there.
    import pneumoscan.allocator as allocator

    monkeypatch.setattr(allocator, "return_large_buffers", lambda: False)
    allocator.low_memory_mode.cache_clear()  # an earlier test may have switched it already
    allocator.low_memory_mode(True)
    warning = capsys.readouterr().err
    assert "cannot give freed memory back" in warning and "no effect" not in warning
    allocator.low_memory_mode(True)  # train --seeds: once a process, not once a seed
    assert capsys.readouterr().err == ""
    allocator.low_memory_mode.cache_clear()


def test_low_memory_flag_reaches_the_run_and_does_not_block_resume(synthetic_data, tmp_path):
    run = tmp_path / "run"
    common = ["train", "--data", str(synthetic_data), "--out", str(run), "--device", "cpu",
              "--image-size", "32", "--epochs", "2", "--quiet"]
    assert main([*common, "--low-memory"]) == 0
    assert json.loads((run / "config.json").read_text())["low_memory"] is True
    # The allocator does not change results: resuming without the flag is the same run.
    assert main([*common, "--resume"]) == 0


def test_low_memory_run_trains_the_same_weights(synthetic_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pneumoscan.models.seed_cnn import SeedCNN

    stem_runs = []
    real_stem = SeedCNN._stem
    monkeypatch.setattr(SeedCNN, "_stem", lambda self, x: stem_runs.append(1) or real_stem(self, x))
    common = ["train", "--data", str(synthetic_data), "--device", "cpu", "--recipe", "seed",
              "--image-size", "32", "--epochs", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert not stem_runs
    assert main([*common, "--out", str(tmp_path / "low"), "--low-memory"]) == 0
    assert stem_runs  # the stem was checkpointed (run again in each backward)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    low = load_file(tmp_path / "low" / "model.safetensors")
    assert plain.keys() == low.keys()
    for name, tensor in plain.items():  # stem recomputed in backward: the same numbers
        assert torch.equal(tensor, low[name]), name


def test_schedule_is_laid_out_over_the_steps_fit_takes():
    from pneumoscan.train import steps_in_epoch

    assert steps_in_epoch(4694, 64, False) == 74  # 73 full batches and one of 22
    assert steps_in_epoch(4694, 64, True) == 73  # compiled or graphed: full batches only
    assert steps_in_epoch(129, 64, False) == 2  # a last batch of one image is left out
    assert steps_in_epoch(128, 64, False) == steps_in_epoch(128, 64, True) == 2


def test_one_cycle_ends_annealed_when_partial_batches_are_left_out(tmp_path, monkeypatch):
    # As on a GPU with CUDA graphs: fit() leaves the partial batch out, and the one-cycle
    # schedule must still reach its end (else the last epochs train at a higher rate).
    monkeypatch.setattr(train_module, "should_compile", lambda *a: True)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the decision, not inductor
    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=2, batch_size=8, device="cpu",
                      augment=AugmentConfig(0, 0, 0), schedule="onecycle", optimizer="adamw",
                      early_stop_patience=0, restore_best=False)
    lrs = []
    real_make = train_module.make_scheduler

    def recording(optimizer, cfg, steps_per_epoch):
        scheduler = real_make(optimizer, cfg, steps_per_epoch)
        lrs.append(scheduler)
        return scheduler

    monkeypatch.setattr(train_module, "make_scheduler", recording)
    fit(cfg, _split(27, 1), _split(8, 2), tmp_path, class_counts=np.array([9, 18]),
        progress=False)  # 27 images: 3 full batches of 8 and a partial one of 3, left out
    scheduler = lrs[0]
    assert scheduler.last_epoch == scheduler.total_steps == 6
