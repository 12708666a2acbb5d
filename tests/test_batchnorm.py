"""Running statistics that have not settled are measured again at the end of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pneumoscan.batchnorm import MAX_BATCHES, settle_batchnorm, unsettled_share
from pneumoscan.cli import main


def _batches(n: int, mean: float, std: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [mean + std * torch.randn(16, 3, generator=g) for _ in range(n)]


def _trained_bn(momentum: float, steps: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(3, momentum=momentum).train()
    for x in _batches(steps, mean=5.0, std=0.01):
        bn(x)
    return bn


def test_keras_momentum_after_few_steps_is_measured_again():
    bn = _trained_bn(momentum=0.01, steps=20)
    assert unsettled_share(bn) == pytest.approx(0.99**20)
    assert bn.running_mean.mean() < 1.0  # still far from the data's mean of 5
    used = settle_batchnorm(bn, iter(_batches(MAX_BATCHES + 5, mean=5.0, std=0.01, seed=1)))
    assert used == MAX_BATCHES * 16  # at most MAX_BATCHES batches are read
    assert torch.allclose(bn.running_mean, torch.full((3,), 5.0), atol=2e-3)
    assert torch.allclose(bn.running_var, torch.full((3,), 1e-4), rtol=0.1)
    assert bn.momentum == 0.01 and bn.training  # left as it was


def test_settled_statistics_and_empty_input_are_left_alone():
    bn = _trained_bn(momentum=0.1, steps=200)
    before = bn.running_var.clone()
    assert settle_batchnorm(bn, iter(_batches(3, mean=0.0, std=1.0))) == 0
    assert torch.equal(bn.running_var, before)
    young = _trained_bn(momentum=0.01, steps=5)
    before = young.running_mean.clone()
    assert settle_batchnorm(young, iter([])) == 0  # nothing to measure: no reset either
    assert torch.equal(young.running_mean, before)


def test_short_run_of_the_report_cnn_gives_spread_out_probabilities(synthetic_data, tmp_path,
                                                                    capsys, monkeypatch):
    # The report's CNN keeps Keras' BatchNorm momentum: after a two-epoch run its statistics
    # still hold much of their start, and evaluating with them gave every image about the same
    # probability. Measured again, the run ranks validation images as training taught it.
    common = ["train", "--data", str(synthetic_data), "--device", "cpu", "--recipe", "cpu",
              "--model", "seed_cnn", "--image-size", "32", "--epochs", "2"]
    assert main([*common, "--out", str(tmp_path / "run")]) == 0
    assert "BatchNorm statistics measured again" in capsys.readouterr().out
    spread = np.load(tmp_path / "run" / "val_predictions.npz")["prob"].std()
    monkeypatch.setattr("pneumoscan.batchnorm.UNSETTLED_SHARE", 1.0)  # never re-measured
    assert main([*common, "--out", str(tmp_path / "unsettled"), "--quiet"]) == 0
    unsettled = np.load(tmp_path / "unsettled" / "val_predictions.npz")["prob"].std()
    assert spread > 10 * unsettled
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["validation"]["roc_auc"] is not None


def test_batches_are_read_one_at_a_time():
    # At 224 px a hundred float batches of 32 take about 2 GB: they must not be held together.
    import weakref

    bn = _trained_bn(momentum=0.01, steps=5)
    alive, most_alive = [0], [0]

    def released():
        alive[0] -= 1

    def batches():
        for seed in range(30):
            x = _batches(1, mean=5.0, std=0.01, seed=seed)[0]
            alive[0] += 1
            most_alive[0] = max(most_alive[0], alive[0])
            weakref.finalize(x, released)
            yield x
            del x

    assert settle_batchnorm(bn, batches()) == 30 * 16
    assert most_alive[0] <= 3


def test_a_data_set_smaller_than_the_batch_is_measured_whole_and_said(synthetic_data, tmp_path,
                                                                      capsys):
    # One step an epoch of every training image: the statistics cannot settle, and the
    # re-measuring must not need a whole batch's worth of images.
    assert main(["train", "--data", str(synthetic_data), "--device", "cpu", "--recipe", "cpu",
                 "--model", "seed_cnn", "--image-size", "32", "--epochs", "1",
                 "--batch-size", "512", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    n_train = int(out.split("train ")[1].split()[0])
    assert f"the batch of 512 is more than the {n_train} training images" in out
    assert f"BatchNorm statistics measured again on {n_train} training images" in out



def _learnable_split(n: int, seed: int):
    from pneumoscan.data.dataset import Split

    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 != 0).astype(np.int64)
    images = rng.integers(0, 120, (n, 32, 32), dtype=np.uint8)
    images[labels == 1, 8:24, 8:24] += 120  # something to learn
    return Split(images, labels, [f"p{i}" for i in range(n)], [f"{i}.png" for i in range(n)])


def _short_fit(tmp_path, name: str):
    from pneumoscan.config import AugmentConfig, TrainConfig
    from pneumoscan.train import fit

    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=3, batch_size=8, device="cpu",
                      augment=AugmentConfig(0, 0, 0), compile=False, early_stop_patience=0)
    return fit(cfg, _learnable_split(48, 1), _learnable_split(24, 2), tmp_path / name,
               class_counts=np.array([16, 32]), progress=False)


def test_epochs_are_judged_on_the_model_as_it_would_be_saved(tmp_path, monkeypatch):
    # Six steps an epoch with Keras' momentum: the running averages never settle during the run.
    # The validation loss that chose the best epoch must be the one the saved model (whose
    # statistics are measured again at the end) has, not that of the unsettled averages.
    from pneumoscan import train as train_module
    from pneumoscan.config import TrainConfig
    from pneumoscan.train import validation_figures

    result = _short_fit(tmp_path, "judged")
    val = _learnable_split(24, 2)
    saved = validation_figures(result.model, torch.from_numpy(val.images),
                               torch.from_numpy(val.labels),
                               TrainConfig(model="seed_cnn", image_size=32, device="cpu"),
                               torch.device("cpu"))
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == pytest.approx(saved["val_loss"], rel=1e-5)
    assert best["val_accuracy"] == pytest.approx(saved["val_accuracy"])

    # Judging on a measured copy leaves training itself as it was.
    monkeypatch.setattr(train_module, "UNSETTLED_SHARE", 1.0)  # no copy is measured
    plain = _short_fit(tmp_path, "plain")
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in result.history]
    assert [r["val_loss"] for r in plain.history] != [r["val_loss"] for r in result.history]
