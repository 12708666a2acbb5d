"""Shared fixtures: a private decode cache per test session, and small generated data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224"
# Processes the tests start (python -m pneumoscan, torchrun) import this checkout's src/ too,
# not the shared environment's editable install, which may point at another clone.
SRC = Path(__file__).resolve().parents[1] / "src"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-image caches and downloads out of the user's home during tests."""
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module: the tests run its main() on the CPU."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small train/ + test/ synthetic set (64 px PNGs), generated once per session."""
    from pneumoscan.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), n_train=90, n_test=30, size=64
    )


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory) -> Path:
    """One tiny trained run directory (seed_cnn, 32 px, 2 epochs), shared by read-only tests."""
    import os

    from pneumoscan.cli import main

    os.environ.setdefault("PNEUMOSCAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    out = tmp_path_factory.mktemp("run") / "run"
    status = main(
        [
            "train",
            "--data",
            str(synthetic_data),
            "--out",
            str(out),
            "--recipe",
            "cpu",
            "--model",
            "seed_cnn",
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--quiet",
        ]
    )
    assert status == 0
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB file system (tmpfs; needs root), removed afterwards."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
