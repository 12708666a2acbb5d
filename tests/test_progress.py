"""What a run says about the time it still needs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pneumoscan.config import TrainConfig
from pneumoscan.data.dataset import Split
from pneumoscan.progress import format_duration, time_left
from pneumoscan.train import fit


@pytest.mark.parametrize("seconds, said", [
    (0, "0 s"), (44.6, "45 s"), (60, "1 min"), (371, "6 min 11 s"), (3600, "1 h"),
    (5 * 3600 + 20 * 60 + 10, "5 h 20 min"), (3600 + 59 * 60 + 40, "2 h"), (-3, "0 s"),
])
def test_format_duration(seconds, said):
    assert format_duration(seconds) == said


def test_time_left_leaves_the_first_epoch_out_once_others_exist():
    assert time_left([30.0], 4) == 120.0  # only the first so far: it is all there is
    assert time_left([30.0, 10.0, 12.0], 5) == 55.0  # compilation in epoch 1 is not repeated
    assert time_left([30.0, 10.0], 0) == 0.0
    assert time_left([], 3) == 0.0


def _split(rng, n: int) -> Split:
    return Split(images=rng.integers(0, 255, (n, 32, 32), dtype=np.uint8),
                 labels=np.arange(n) % 2, patients=[str(i) for i in range(n)],
                 paths=[str(i) for i in range(n)])


@pytest.mark.parametrize("patience, word", [(0, "about"), (5, "at most")])
def test_each_epoch_line_but_the_last_says_the_time_left(tmp_path, capsys, patience, word):
    rng = np.random.default_rng(0)
    cfg = TrainConfig(model="seed_cnn", image_size=32, epochs=3, batch_size=4, device="cpu",
                      early_stop_patience=patience, out=str(tmp_path))
    fit(cfg, _split(rng, 8), _split(rng, 4), tmp_path, class_counts=np.array([4, 4]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    for line in lines[:2]:
        assert re.search(rf"  {word} \d+ (s|min)[\w ]* left$", line), line
    assert not lines[2].endswith("left")


def test_a_gpu_recipe_on_a_cpu_says_it_takes_hours(tmp_path, capsys, monkeypatch):
    from pneumoscan import train

    monkeypatch.setattr(train, "CPU_HOURS_WORK_224", 4)  # as if 4 images were a data set
    rng = np.random.default_rng(0)
    common = dict(model="seed_cnn", epochs=1, batch_size=4, device="cpu", out=str(tmp_path))
    # 224 px and the strong recipe: the note; the same recipe made small: none.
    for image_size, noted in ((224, True), (32, False)):
        cfg = TrainConfig(recipe="strong", image_size=image_size, **common)
        data = Split(images=rng.integers(0, 255, (4, image_size, image_size), dtype=np.uint8),
                     labels=np.arange(4) % 2, patients=list("abcd"), paths=list("abcd"))
        fit(cfg, data, data, tmp_path / str(image_size), class_counts=np.array([2, 2]))
        said = capsys.readouterr().out
        assert ("on a CPU it takes hours" in said) is noted, said
