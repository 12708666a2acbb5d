"""PneumoniaMNIST as a data source: a small file in MedMNIST's format, and offline behaviour."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.data import medmnist
from pneumoscan.data.dataset import load_data
from pneumoscan.data.synthetic import synthetic_xray
from pneumoscan.errors import PneumoscanError


def _write_fake_pneumoniamnist(size: int, counts=(60, 24, 30)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        labels = (np.arange(n) % 3 != 0).astype(np.uint8)
        arrays[f"{split}_images"] = np.stack([synthetic_xray(rng, size, bool(y)) for y in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)  # MedMNIST stores (N, 1)
    path = medmnist.cache_dir() / medmnist.FILES[size][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)


def test_spec_parsing_and_size_choice():
    assert medmnist.parse_spec("pneumoniamnist") is None
    assert medmnist.parse_spec("PneumoniaMNIST:128") == 128
    with pytest.raises(PneumoscanError, match="sizes 28, 64, 128, 224"):
        medmnist.parse_spec("pneumoniamnist:100")
    assert medmnist.pick_size(None, 64) == 64
    assert medmnist.pick_size(None, 96) == 128
    assert medmnist.pick_size(None, 512) == 224


def test_offline_fails_at_once_with_what_to_pass(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    with pytest.raises(PneumoscanError, match="offline, pass --data DIR") as e:
        load_data("pneumoniamnist:64", 64, progress=False)
    assert "\n" not in str(e.value)


def test_a_cached_file_is_used_and_its_splits_kept(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path))
    _write_fake_pneumoniamnist(64)
    data = load_data("pneumoniamnist", 32, progress=False)  # resized from the 64 px file
    assert data.train.images.shape[1:] == (32, 32)
    assert len(data.test) == 30
    assert len(data.train) + len(data.val) == 60  # its val of 24 is too small: ignored, carved
    assert data.test.labels.dtype == np.int64 and set(data.test.labels.tolist()) == {0, 1}


def test_train_defaults_to_pneumoniamnist(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    _write_fake_pneumoniamnist(64)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--recipe", "cpu", "--model", "seed_cnn",
            "--image-size", "32", "--epochs", "1", "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "pneumoniamnist"
    assert json.loads((out / "test_metrics.json").read_text())["n"] == 30
    assert os.path.exists(out / "model.safetensors")


def test_data_source_description_reads_back_and_hides_server_folders():
    from pneumoscan.serve.app import public_meta

    source = medmnist.describe(64, Path("/srv/cache/pneumoscan/medmnist/pneumoniamnist_64.npz"))
    assert medmnist.spec_of(source) == "pneumoniamnist:64"
    assert medmnist.spec_of("/data/chest_xray") is None
    shown = public_meta({"data_source": source})["data_source"]
    assert shown == "PneumoniaMNIST 64 px (pneumoniamnist_64.npz)"
    assert public_meta({"data_source": "/data/chest_xray"})["data_source"] == "chest_xray"
