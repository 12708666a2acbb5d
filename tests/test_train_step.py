"""The fast training step against a plain reference, class weights, early stopping, augmentation.

The fast path (``TrainStep``: uint8 batch on the device, augmentation there, no host sync) must
compute exactly what a plain eager loop computes when augmentation is off; these tests pin that
down on CPU, where everything is deterministic.
"""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_benchmark
from pneumoscan.augment import augment_batch
from pneumoscan.commands.train import process_age_s
from pneumoscan.config import AugmentConfig, TrainConfig
from pneumoscan.data.dataset import Split
from pneumoscan.pipeline import describe_run_time
from pneumoscan.train import (
    METRICS,
    EarlyStopping,
    TrainStep,
    balanced_class_weights,
    build_model,
    describe_fit_timings,
    fit,
    make_optimizer,
    predict_logits,
    weighted_loss,
)

NO_AUGMENT = AugmentConfig(rotation_deg=0.0, zoom=0.0, shift=0.0, hflip=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: a second thread only adds spin-wait contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kw) -> TrainConfig:
    base = dict(model="seed_cnn", image_size=32, in_chans=3, mean=0.5, std=0.25, lr=1e-2,
                adam_eps=1e-7, device="cpu", augment=NO_AUGMENT, compile=False)
    return TrainConfig(**{**base, **kw})


def _batch(n: int = 12, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3 != 0  # both classes, 2:1 like the real data
    return images, labels.long()


def _plain_adam_step(params, grads, state, *, lr, eps, step, betas=(0.9, 0.999)) -> None:
    """Adam (Kingma and Ba, algorithm 1, as torch.optim.Adam orders the arithmetic)."""
    b1, b2 = betas
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


# ---- the fast path equals a plain eager loop


def test_train_step_matches_plain_eager_loop_exactly():
    cfg = _config()
    torch.manual_seed(0)
    fast_model = build_model(cfg)
    plain_model = copy.deepcopy(fast_model)
    # Counts unlike the batch's 4:8, so that the batch's weights do not sum to its size (where
    # the mean of weighted losses and their weighted average would coincide).
    weights = balanced_class_weights(np.array([3, 9]))
    step = TrainStep(fast_model, make_optimizer(fast_model, cfg, torch.device("cpu")), None, cfg,
                     weights, torch.device("cpu"), torch.Generator().manual_seed(1))
    plain_params = list(plain_model.parameters())
    adam_state: dict = {}
    for i in range(3):  # several steps, so Adam's moments and bias correction are exercised
        images, labels = _batch(seed=i)
        torch.manual_seed(100 + i)  # the same dropout masks on both paths
        fast_loss, fast_correct = step(images, labels)

        torch.manual_seed(100 + i)
        x = images[:, None].float() / 255
        x = ((x - cfg.mean) / cfg.std).repeat(1, 3, 1, 1)
        logits = plain_model(x)
        per_image = F.cross_entropy(logits, labels, reduction="none")
        plain_loss = (per_image * weights[labels]).mean()  # Keras class_weight: mean, not / sum w
        grads = torch.autograd.grad(plain_loss, plain_params)
        with torch.no_grad():
            _plain_adam_step(plain_params, grads, adam_state, lr=cfg.lr, eps=cfg.adam_eps,
                             step=i + 1)

        assert torch.equal(fast_loss, plain_loss.detach()), (i, fast_loss, plain_loss)
        assert int(fast_correct) == int((logits.argmax(1) == labels).sum())
        for (name, a), b in zip(fast_model.named_parameters(), plain_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=f"step {i}: {name}")
    # The step really moved the weights (else the comparison above proves nothing).
    assert not torch.equal(next(fast_model.parameters()), next(build_model(cfg).parameters()))
    # Running statistics follow the same batches too.
    for (name, a), b in zip(fast_model.named_buffers(), plain_model.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_weighted_loss_equals_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    w = torch.tensor([2.0, 0.5])  # the batch's weights sum to 5, not to its size 4

    def nll(row, label):  # -log softmax, by hand
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    expected = sum(w[y].item() * nll(r, y) for r, y in zip(rows, labels.tolist(), strict=True))
    expected /= len(rows)  # Keras divides by the batch size, not by the sum of the weights
    assert weighted_loss(logits, labels, w, 0.0).item() == pytest.approx(expected, rel=1e-6)
    unweighted = sum(nll(r, y) for r, y in zip(rows, labels.tolist(), strict=True)) / len(rows)
    assert weighted_loss(logits, labels, None, 0.0).item() == pytest.approx(unweighted, rel=1e-6)


def test_balanced_class_weights_on_kermany_counts():
    w = balanced_class_weights(np.array([1341, 3875]))
    assert w.dtype == torch.float32
    assert w[0].item() == pytest.approx(5216 / (2 * 1341), rel=1e-6)  # 1.9448
    assert w[1].item() == pytest.approx(5216 / (2 * 3875), rel=1e-6)  # 0.6730
    assert [round(v, 2) for v in w.tolist()] == [1.94, 0.67]
    # Balanced weights make each class carry the same total weight.
    assert 1341 * w[0].item() == pytest.approx(3875 * w[1].item(), rel=1e-6)


# ---- early stopping


def test_early_stopping_state_machine():
    s = EarlyStopping(patience=2, min_delta=0.01)
    assert s.update(1.0, 1) and s.best_epoch == 1
    assert not s.update(0.995, 2)  # better, but by less than min_delta: not an improvement
    assert s.wait == 1 and not s.should_stop
    assert s.update(0.98, 3) and s.best_epoch == 3 and s.wait == 0  # 0.02 below the best
    assert not s.update(0.975, 4) and not s.should_stop
    assert not s.update(2.0, 5) and s.should_stop
    assert s.best_loss == 0.98 and s.best_epoch == 3


def test_early_stopping_off_when_patience_zero():
    s = EarlyStopping(patience=0, min_delta=0.0)
    s.update(1.0, 1)
    for epoch in range(2, 20):
        s.update(5.0, epoch)
    assert not s.should_stop and s.best_epoch == 1


def _random_split(n: int, size: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 3 != 0).astype(np.int64)
    return Split(images, labels, [f"p{i}" for i in range(n)], [f"{i}.png" for i in range(n)])


def _expected_best_epoch(val_losses: list[float], min_delta: float) -> int:
    best, best_epoch = math.inf, 0
    for epoch, loss in enumerate(val_losses, start=1):
        if loss < best - min_delta:
            best, best_epoch = loss, epoch
    return best_epoch


def test_fit_early_stops_and_restores_best_weights(tmp_path, monkeypatch, capsys):
    # Random labels and a high learning rate: validation loss bounces, so patience 1 stops early
    # and the best epoch is not the last one. BatchNorm statistics are left as the best epoch
    # had them (a run this short would have them measured again: test_batchnorm.py).
    monkeypatch.setattr("pneumoscan.batchnorm.UNSETTLED_SHARE", 1.0)
    cfg = _config(epochs=6, batch_size=8, lr=0.01, early_stop_patience=1,
                  early_stop_min_delta=0.001, restore_best=True, augment=AugmentConfig())
    train, val = _random_split(32, 32, seed=1), _random_split(16, 32, seed=2)
    result = fit(cfg, train, val, tmp_path, class_counts=np.array([11, 21]), progress=True)

    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert rows == result.history and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    val_losses = [r["val_loss"] for r in rows]
    assert result.stopped_early and len(rows) < cfg.epochs
    out = capsys.readouterr().out
    assert f"the model keeps the weights of epoch {result.best_epoch}, the lowest" in out
    assert result.best_epoch == _expected_best_epoch(val_losses, cfg.early_stop_min_delta)
    assert result.best_epoch == int(np.argmin(val_losses)) + 1
    assert result.best_epoch < len(rows)
    # The returned weights are the best epoch's: they give back that epoch's validation loss.
    logits = predict_logits(result.model, torch.from_numpy(val.images), cfg, torch.device("cpu"))
    val_loss = F.cross_entropy(logits, torch.from_numpy(val.labels)).item()
    assert val_loss == pytest.approx(val_losses[result.best_epoch - 1], abs=1e-6)
    assert val_loss != pytest.approx(val_losses[-1], abs=1e-4)
    # ... and the checkpoint holds the same copy, not an alias of the live parameters.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for name, value in result.model.state_dict().items():
        assert torch.equal(state["best_model"][name], value), name
    assert not all(torch.equal(state["model"][k], v) for k, v in state["best_model"].items())


def test_fit_on_rows_of_a_pool_equals_fit_on_their_copy(tmp_path):
    # Cross-validation folds train on rows of one shared pool; that must be the very same
    # training as on a copy of those rows (same batches, same augmentation, same weights).
    cfg = _config(epochs=2, batch_size=8, augment=AugmentConfig())
    pool, val = _random_split(40, 32, seed=3), _random_split(12, 32, seed=4)
    rows = np.random.default_rng(5).permutation(40)[:27]  # a partial last batch too
    counts = np.array([9, 18])
    on_rows = fit(cfg, pool, val, tmp_path / "rows", train_rows=rows, class_counts=counts,
                  progress=False)
    on_copy = fit(cfg, pool.subset(rows), val, tmp_path / "copy", class_counts=counts,
                  progress=False)
    assert [r["train_loss"] for r in on_rows.history] == [r["train_loss"] for r in on_copy.history]
    for (name, a), b in zip(on_rows.model.state_dict().items(),
                            on_copy.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # ... and differs from training on all of the pool, so the rows were really used.
    on_pool = fit(cfg, pool, val, tmp_path / "pool", class_counts=counts, progress=False)
    assert on_pool.history[0]["train_loss"] != on_rows.history[0]["train_loss"]


def test_fit_accounts_for_its_time(tmp_path):
    # The closing line of `train` says where a run's time went: the epochs' share must be the
    # epochs' own seconds from the log, and the parts cannot add up to more than fit took.
    cfg = _config(epochs=2, batch_size=8, augment=AugmentConfig())
    train, val = _random_split(24, 32, seed=6), _random_split(8, 32, seed=7)
    t0 = time.perf_counter()
    result = fit(cfg, train, val, tmp_path, class_counts=np.array([8, 16]), progress=False)
    elapsed = time.perf_counter() - t0
    t = result.timings
    assert list(t)[:4] == ["set-up", "epochs", "validation", "checkpoints"]
    assert t["epochs"] == pytest.approx(sum(r["seconds"] for r in result.history), abs=0.01)
    assert t["first epoch"] == pytest.approx(result.history[0]["seconds"], abs=0.001)
    assert all(v > 0 for v in t.values())
    assert sum(v for k, v in t.items() if k != "first epoch") <= elapsed
    line = describe_fit_timings(t)
    assert line.startswith(f"set-up {t['set-up']:.1f} s, epochs {t['epochs']:.1f} s (the first ")


def test_run_time_line_adds_start_up_when_known():
    timings = {"set-up": 1.0, "epochs": 10.0, "validation": 0.5, "checkpoints": 0.25,
               "first epoch": 6.0}
    line = describe_run_time(total=20.0, data=2.0, training=12.0, fit_timings=timings,
                             finishing=6.0, startup=9.0)
    assert line.startswith("done in 29.0 s: start-up 9.0 s, data 2.0 s, "
                           "training 12.0 s (set-up 1.0 s, epochs 10.0 s (the first 6.0 s), ")
    assert line.endswith("plots 6.0 s")
    # On a GPU the data loads beside the start-up and the GPU's warm-up: their times are said.
    line = describe_run_time(total=20.0, data=0.5, training=12.0, fit_timings=timings,
                             finishing=6.0, startup=9.0, warm_up=1.5)
    assert line.startswith("done in 29.0 s: start-up 9.0 s, GPU warm-up 1.5 s, data 0.5 s, ")
    assert describe_run_time(total=20.0, data=2.0, training=12.0, fit_timings={},
                             finishing=6.0).startswith("done in 20.0 s: data 2.0 s, "
                                                                  "training 12.0 s, calibration")
    # One epoch: it is the first, so that is not said twice.
    assert describe_fit_timings({"set-up": 1.0, "epochs": 5.0, "first epoch": 5.0}) == (
        "set-up 1.0 s, epochs 5.0 s")


def test_process_age_is_this_process_age():
    age = process_age_s()
    if age is None:
        pytest.skip("no /proc here")
    # This test process has run pytest's collection at least: more than nothing, under a day.
    assert 0.0 < age < 86_400
    time.sleep(0.05)
    assert process_age_s() >= age


# ---- augmentation


def _asymmetric_images(n: int, size: int = 32) -> torch.Tensor:
    """A bright block in the left third on a dark ramp: mirroring it is unmistakable."""
    x = torch.linspace(0.1, 0.3, size).expand(size, size).clone()
    x[size // 4 : 3 * size // 4, 2 : size // 3] = 1.0
    return x.expand(n, 1, size, size).clone()


def test_augment_is_identity_when_ranges_are_zero():
    x = torch.rand(4, 1, 32, 32)
    assert torch.equal(augment_batch(x, NO_AUGMENT, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_keeps_shape_and_dtype(dtype):
    x = torch.rand(5, 3, 40, 24, dtype=dtype)
    y = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()


def test_augment_draws_fresh_parameters_per_image():
    x = _asymmetric_images(2)
    y = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert not torch.equal(y[0], y[1])
    assert (y[0] - y[1]).abs().max() > 0.1
    # ... and from the generator: the same seed gives the same batch.
    assert torch.equal(y, augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0)))


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_never_mirrors_unless_asked(hflip):
    x = _asymmetric_images(64)
    cfg = AugmentConfig(rotation_deg=5.0, zoom=0.05, shift=0.02, hflip=hflip)
    y = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    mirrored = _correlation(y, x.flip(-1)) > _correlation(y, x)
    if hflip:  # the check can see a flip: about half the batch is mirrored
        assert 16 < int(mirrored.sum()) < 48
    else:
        assert not mirrored.any()
    assert AugmentConfig().hflip is False  # and flips are off by default


def test_augment_repeats_edge_pixels():
    x = torch.ones(16, 1, 32, 32)  # a constant-255 image, scaled to [0, 1]
    for cfg in (AugmentConfig(rotation_deg=0, zoom=0, shift=0.1),  # shift alone
                AugmentConfig(rotation_deg=30, zoom=0.2, shift=0.1)):  # zoomed out and rotated
        y = augment_batch(x, cfg, torch.Generator().manual_seed(0))
        assert (y > 0.999).all(), f"{cfg}: min {y.min().item()}"  # no zeros padded in


# ---- the speed benchmark runs the same code on CPU (its GPU run is in benchmarks/gpu_check.sh)


def test_train_speed_benchmark_runs_on_cpu(capsys):
    pytest.importorskip("torchvision")

    train_speed = load_benchmark("train_speed")
    argv = ["--model", "seed_cnn", "--image-size", "32", "--batch-size", "8", "--device", "cpu",
            "--steps", "2", "--warmup", "1", "--threads", "1"]
    assert train_speed.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"model", "image_size", "batch_size", "device", "project_images_per_s",
            "plain_images_per_s", "ratio", "torch", "command"} <= set(result)
    assert result["model"] == "seed_cnn" and result["image_size"] == 32
    assert result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["project_images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["project_images_per_s"] / result["plain_images_per_s"], rel=0.02)
    assert result["command"].startswith("python benchmarks/train_speed.py --model seed_cnn")


def test_train_speed_profile_names_the_convolutions(capsys):
    # The profile is there to say where a step's time goes: for a CNN, into its convolutions.

    train_speed = load_benchmark("train_speed")
    argv = ["--model", "seed_cnn", "--image-size", "32", "--batch-size", "8", "--device", "cpu",
            "--steps", "1", "--warmup", "1", "--threads", "1", "--skip-plain", "--profile", "2"]
    assert train_speed.main(argv) == 0
    out = capsys.readouterr().out
    profile = json.loads(out.strip().splitlines()[-1])["profile"]
    assert 0 < len(profile) <= 15
    shares = [row["share"] for row in profile]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert any("convolution" in row["op"] for row in profile[:3])
    assert all(row["ms_per_step"] > 0 and row["calls_per_step"] > 0 for row in profile)
    assert "ms of CPU operator time a step" in out


def test_gpu_profile_counts_each_kernel_once():
    # On a GPU the operator that launched a kernel reports that kernel's time as its own device
    # time too: only the device's own events may be summed (as torch's table does).
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    train_speed = load_benchmark("train_speed")

    def event(key, device, device_us, cpu_us=5.0, annotation=False):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us, is_user_annotation=annotation)

    events = [event("aten::cudnn_convolution", DeviceType.CPU, 900.0),  # its kernel's time
              event("sm90_xmma_fprop_kernel", DeviceType.CUDA, 900.0, cpu_us=0.0),
              event("vectorized_elementwise_kernel", DeviceType.CUDA, 100.0, cpu_us=0.0),
              event("ProfilerStep", DeviceType.CUDA, 1000.0, annotation=True)]
    kept = train_speed.timed_events(events, on_gpu=True)
    assert [e.key for e in kept] == ["sm90_xmma_fprop_kernel", "vectorized_elementwise_kernel"]
    assert sum(e.self_device_time_total for e in kept) == 1000.0
    assert [e.key for e in train_speed.timed_events(events, on_gpu=False)] == [
        "aten::cudnn_convolution", "ProfilerStep"]


@pytest.mark.parametrize("model, in_chans", [("seed_cnn", 3), ("resnet10t", 1)])
def test_the_warm_up_passes_run_the_runs_shapes_and_leave_the_random_streams(
        model, in_chans, monkeypatch):
    # On a GPU they run while the images decode (cuDNN picks its algorithms by shape then); the
    # CPU runs the same passes here, so a wrong shape or argument shows without one.
    import pneumoscan.train as train

    cfg = _config(model=model, in_chans=in_chans, batch_size=6, eval_batch_size=5)
    before = torch.get_rng_state()
    train.throwaway_passes(cfg, torch.device("cpu"), world_size=2)  # three images a process
    assert torch.equal(torch.get_rng_state(), before)

    def no_passes_on_a_cpu(*args):
        raise AssertionError("the CPU has nothing to warm up")

    monkeypatch.setattr(train, "throwaway_passes", no_passes_on_a_cpu)
    train.warm_up(cfg, torch.device("cpu"))


def test_train_speed_profile_on_a_gpu_names_each_operators_input_shapes(capsys):
    # The kernels' names rarely tell the layers apart; the operators' input shapes do.
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    train_speed = load_benchmark("train_speed")

    def event(key, shapes, device_us, device=DeviceType.CPU):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=device_us,
                               input_shapes=shapes, count=4)

    prof = SimpleNamespace(key_averages=lambda group_by_input_shape: [
        event("aten::convolution_backward", [[512, 16, 224, 224], [16, 16, 3, 3], []], 3000.0),
        event("aten::relu_", [[512, 16, 224, 224]], 1000.0),
        event("sm90_xmma_wgrad", [], 3000.0, DeviceType.CUDA),  # a kernel: counted in its op
        event("aten::view", [[512, 16]], 0.0),  # launched nothing
    ])
    train_speed.print_operators_by_shape(prof, steps=2, rows=5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(2.0 ms a step):")
    assert lines[1].split() == ["75.0%", "1.500", "ms", "2.0x", "aten::convolution_backward",
                                "[512,", "16,", "224,", "224],", "[16,", "16,", "3,", "3]"]
    assert "aten::relu_ [512, 16, 224, 224]" in lines[2] and len(lines) == 3


def test_step_traffic_counts_one_images_share_of_the_step(capsys):
    step_traffic = load_benchmark("step_traffic")
    figures = {}
    for size in (32, 64):
        assert step_traffic.main(["--model", "seed_cnn", "--image-size", str(size)]) == 0
        figures[size] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    small, large = figures[32], figures[64]
    # One image's share is its activations: four times the pixels, about four times the bytes
    # and the arithmetic (the weights' traffic, per step, drops out of the difference).
    assert 3.5 < large["mb_per_image"]["eager"] / small["mb_per_image"]["eager"] < 4.5
    assert 3.5 < large["gflop_per_image"] / small["gflop_per_image"] < 4.5
    assert 0 < large["mb_per_image"]["compute_ops_only"] < large["mb_per_image"]["eager"]
    bounds = large["images_per_s_bound"]
    assert bounds["eager"] < bounds["compute ops only"] <= large["arithmetic_bound_images_per_s"]
    # The report's CNN at 64 px: 2 full-resolution convolutions of 16 channels, each output
    # 64 * 64 * 16 bf16 values (131 kB) written in forward: a floor for what the step moves.
    assert large["mb_per_image"]["compute_ops_only"] > 2 * 0.131


def test_conv_layers_times_each_convolution_in_both_layouts(capsys):
    conv_layers = load_benchmark("conv_layers")
    argv = ["--model", "seed_cnn", "--image-size", "32", "--batch-size", "2", "--device", "cpu",
            "--iters", "1", "--warmup", "1"]
    assert conv_layers.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kinds = [row["kind"].split()[0] for row in result["layers"]]
    assert kinds == ["full", "full"] + ["depthwise", "pointwise"] * 8  # the report's CNN
    assert result["layers"][0]["input"] == [3, 32, 32]
    last = result["layers"][-1]
    assert last["input"] == [256, 2, 2] and last["out_channels"] == 256
    for row in result["layers"]:
        for layout in ("channels_last", "default"):
            assert 0 < row[layout]["forward_ms"] and 0 < row[layout]["forward_backward_ms"]
    assert result["best_layouts_ms"] <= min(result["total_forward_backward_ms"].values())
