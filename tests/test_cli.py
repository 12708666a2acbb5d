"""End to end through main(argv): train -> evaluate -> eda on a few dozen generated images."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_DATA, load_benchmark
from pneumoscan.cli import main
from pneumoscan.model_io import read_meta

EVALUATE_KEYS = {
    "n",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "roc_auc",
    "pr_auc",
    "loss",
    "brier",
    "ece",
    "threshold",
    "confusion",
    "ci95",
}
METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "images_per_s",
}


def test_train_writes_a_complete_run_directory(trained_run):
    for name in (
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "model.json",
        "checkpoint.pt",
        "test_metrics.json",
        "plots/learning_curves.png",
    ):
        assert (trained_run / name).exists(), name
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    meta = read_meta(trained_run)
    assert meta["architecture"] == "seed_cnn" and meta["image_size"] == 32
    assert 0 <= meta["threshold"] <= 1 and meta["temperature"] > 0
    assert meta["data_fingerprint"]
    assert meta["epochs_trained"] == meta["weights_from_epoch"] == 2  # last weights (cpu recipe)
    config = json.loads((trained_run / "config.json").read_text())
    assert config["recipe"] == "cpu" and config["epochs"] == 2
    # What the run was made with, so that its figures can be traced to a machine and versions.
    env = config["environment"]
    assert env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["python"] == platform.python_version() and env["processes"] == 1
    threads = torch.get_num_threads()
    assert env["device"].endswith(f"{threads} thread{'' if threads == 1 else 's'}")


def test_evaluate_json_has_the_documented_keys(trained_run, synthetic_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(trained_run),
                "--data",
                str(synthetic_data),
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    figures = json.loads(out.read_text())
    assert EVALUATE_KEYS <= figures.keys()
    assert figures["n"] == 30
    assert set(figures["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert sum(figures["confusion"].values()) == 30
    assert figures["threshold"] == read_meta(trained_run)["threshold"]
    low, high = figures["ci95"]["accuracy"]
    assert low <= figures["accuracy"] <= high
    # The synthetic files are named as Kermany's are: 10 bacterial and 10 viral of 30.
    by_kind = figures["sensitivity_by_kind"]
    assert {k: v["n"] for k, v in by_kind.items()} == {"bacterial": 10, "viral": 10}
    out = capsys.readouterr().out
    assert "sensitivity" in out and "viral (10)" in out


@pytest.mark.parametrize("given", ["0.9", "fixed:0.9", "FIXED:0.9", " fixed:0.9 "])
def test_evaluate_threshold_overrides_the_stored_one(trained_run, synthetic_data, tmp_path,
                                                      given):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained_run), "--data", str(synthetic_data), "--json",
                 str(out), "--threshold", given, "--quiet"]) == 0
    assert json.loads(out.read_text())["threshold"] == 0.9


@pytest.mark.parametrize("given, reason", [("youden", "give them to train"),
                                           ("1.5", "a probability, 0 to 1"),
                                           ("nan", "a probability, 0 to 1")])
def test_evaluate_threshold_refuses_what_is_no_probability(trained_run, given, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(trained_run), "--threshold", given])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err


def test_evaluate_takes_a_folder_with_only_a_test_split(trained_run, synthetic_data, tmp_path,
                                                        capsys):
    import shutil

    shutil.copytree(synthetic_data / "test", tmp_path / "only-test" / "test")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained_run), "--data", str(tmp_path / "only-test"),
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["n"] == 30
    assert "only-test/test (30 images" in capsys.readouterr().out


def test_eda_writes_charts_and_a_table(synthetic_data, tmp_path, capsys):
    out = tmp_path / "eda"
    assert (
        main(
            [
                "eda",
                "--data",
                str(synthetic_data),
                "--out",
                str(out),
                "--image-size",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    for name in ("class_balance.png", "sample_grid.png", "eda.json", "eda.txt"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "eda.json").read_text())
    assert set(summary["splits"]) == {"train", "test"}  # as on disk: no val/, none carved
    total = sum(c["n"] for s in summary["splits"].values() for c in s["classes"].values())
    assert total == 120
    # Patients, which validation and folds draw, beside the images.
    from pneumoscan.data.discover import discover

    on_disk = discover(synthetic_data, need_train=False)["train"]
    patients = {s.patient for s in on_disk if s.label == 1}
    assert len(patients) < sum(s.label == 1 for s in on_disk)  # some patients have two
    assert summary["splits"]["train"]["classes"]["PNEUMONIA"]["patients"] == len(patients)
    # The table's mean and std are those of the decoded images: it says at what size.
    assert "grey levels (0-255) of the images decoded at 32 px" in (out / "eda.txt").read_text()
    assert "PNEUMONIA" in capsys.readouterr().out


def test_models_lists_names_and_keras_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "seed_cnn" in out and "6,642,594" in out and "6,640,226" in out
    assert "resnet18" in out


def test_models_at_a_size_some_cannot_take_says_so_in_their_row(capsys):
    assert main(["models", "--image-size", "48"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert "image size divisible by 32, got 48" in rows["seed_cnn"]
    assert "11,180,866" in rows["resnet18"]  # the others are counted as usual


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/folder", "--quiet"], "not a folder"),
        (["evaluate", "/nonexistent/run"], "not a run directory"),
        (["train", "--data", "x", "--threshold-rule", "median"], "youden"),
    ],
)
def test_bad_usage_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) if argv[-2] == "--threshold-rule" else _nullcontext() as e:
        status = main(argv)
    status = e.value.code if hasattr(e, "value") and e.value is not None else status
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # argparse adds its usage line


def _exit_status_and_err(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", ["train", "cv"])
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--image-size", "0", "--image-size: expected a whole number from 8 to 2048, got '0'"),
        ("--image-size", "-5", "--image-size: expected a whole number from 8 to 2048"),
        ("--image-size", "100000", "--image-size: expected a whole number from 8 to 2048"),
        ("--batch-size", "1", "--batch-size: expected a whole number of at least 2, got '1'"),
        ("--epochs", "0", "--epochs: expected a whole number of at least 1, got '0'"),
        ("--epochs", "two", "--epochs: expected a whole number of at least 1, got 'two'"),
        ("--lr", "0", "--lr: expected a number above 0, got '0'"),
        ("--lr", "nan", "--lr: expected a number above 0, got 'nan'"),
        ("--val-fraction", "0.6", "expected a number above 0 and below 0.5, got '0.6'"),
        # scikit-learn's folds take seeds 0 to 2**32 - 1: a traceback after decoding, before.
        ("--seed", "-1", "--seed: expected a whole number from 0 to 2147483647, got '-1'"),
        ("--seed", "4294967296", "--seed: expected a whole number from 0 to 2147483647"),
    ],
)
def test_out_of_range_training_options_exit_2_in_one_line(command, option, value, message,
                                                          capsys, tmp_path):
    # Before: a traceback from deep in the run (size must be positive; BatchNorm's "expected
    # more than 1 value per channel"), or, for --epochs 0, an untrained model saved as a run.
    argv = [command, "--data", "/nonexistent", "--out", str(tmp_path / "run"), option, value]
    status, err = _exit_status_and_err(argv, capsys)
    assert status == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "RUN", "x.png", "--batch-size", "0"],
         "--batch-size: expected a whole number of at least 1, got '0'"),
        (["serve", "RUN", "--port", "70000"],
         "--port: expected a whole number from 0 to 65535, got '70000'"),
    ],
)
def test_out_of_range_predict_and_serve_options_exit_2_in_one_line(argv, message, capsys):
    status, err = _exit_status_and_err(argv, capsys)
    assert status == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-4", "100000"])
def test_eda_image_size_out_of_range_is_one_line(value, capsys, tmp_path):
    # Before: "size must be positive" or numpy's "negative dimensions" as tracebacks.
    argv = ["eda", "--data", "/nonexistent", "--out", str(tmp_path / "eda"), "--image-size", value]
    status, err = _exit_status_and_err(argv, capsys)
    assert status == 2 and "--image-size: expected a whole number from 8 to 2048" in err
    assert "Traceback" not in err and not (tmp_path / "eda").exists()


@pytest.mark.parametrize(
    "model, size, message",
    [
        ("seed_cnn", "33", "--model seed_cnn cannot take 33 x 33 px images (seed_cnn needs an "
                           "image size divisible by 32, got 33)"),
        ("densenet121", "16", "--model densenet121 cannot take 16 x 16 px images"),
        ("resnet19", "64", "unknown model 'resnet19'"),
        ("resnet1*", "64", "unknown model 'resnet1*'"),  # a pattern is not a model name
    ],
)
def test_a_model_that_cannot_take_the_size_fails_before_any_decoding(model, size, message,
                                                                    capsys, tmp_path):
    # The data folder does not exist: the model's error comes first, so nothing was decoded.
    argv = ["train", "--data", "/nonexistent", "--out", str(tmp_path / "run"), "--model", model,
            "--image-size", size]
    status, err = _exit_status_and_err(argv, capsys)
    assert status == 2 and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_what_cannot_train_is_refused_before_decoding(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    status, err = _exit_status_and_err(["train", "--data", "/nonexistent", "--out", str(out),
                                        "--model", "seed_cnn", "--pretrained"], capsys)
    assert status == 2 and "--pretrained applies to timm backbones" in err
    status, err = _exit_status_and_err(["train", "--data", "/nonexistent", "--out", str(out),
                                        "--model", "resnet10t", "--pretrained",
                                        str(tmp_path / "missing.pth")], capsys)
    assert status == 2 and "missing.pth: pretrained weights file not found" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it
    monkeypatch.setenv("RANK", "0")
    status, err = _exit_status_and_err(["train", "--data", "/nonexistent", "--out", str(out),
                                        "--batch-size", "6"], capsys)
    assert status == 2 and "--batch-size 6 over 4 processes leaves 1 image(s)" in err
    # A batch the processes cannot share evenly would train a smaller one than the run states
    # (and its learning rate was scaled for): refused before decoding, with the nearest that fit.
    status, err = _exit_status_and_err(["train", "--data", "/nonexistent", "--out", str(out),
                                        "--batch-size", "18"], capsys)
    assert status == 2 and err.strip().endswith(
        "the batch of 18 does not split evenly over 4 processes; give --batch-size 16 or 20")
    assert not out.exists()


@pytest.mark.parametrize("rank, message", [
    (None, "WORLD_SIZE is set in the environment but RANK is not; unset WORLD_SIZE, or start "
           "the command with torchrun"),
    ("two", "RANK='two' in the environment is not a process's rank"),
    ("2", "RANK=2 and LOCAL_RANK=0 in the environment do not fit WORLD_SIZE=2"),
])
def test_a_stray_world_size_is_one_line_before_decoding(rank, message, capsys, tmp_path,
                                                        monkeypatch):
    """WORLD_SIZE without torchrun's RANK ended in a KeyError traceback, after decoding."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    for seeds in ([], ["--seeds", "0,1"]):
        status, err = _exit_status_and_err(
            ["train", "--data", "/nonexistent", "--out", str(tmp_path / "r"), *seeds], capsys)
        assert status == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_unknown_option_is_named_with_its_command(capsys):
    status, err = _exit_status_and_err(["cv", "--data", "x", "--out", "y", "--resume"], capsys)
    assert status == 2 and err == "pneumoscan cv: error: unrecognized arguments: --resume"


def test_seeds_out_of_range_are_one_line(capsys, tmp_path):
    status, err = _exit_status_and_err(
        ["train", "--data", "/nonexistent", "--out", str(tmp_path / "r"), "--seeds", "0,-1"],
        capsys)
    assert status == 2 and "--seeds '0,-1': expected a whole number from 0 to" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()
    status, err = _exit_status_and_err(
        ["stack", "a", "b", "--out", str(tmp_path / "s"), "--seed", "-1"], capsys)
    assert status == 2 and "--seed: expected a whole number from 0 to" in err


def test_cv_folds_below_two_is_a_usage_error(capsys, tmp_path):
    status, err = _exit_status_and_err(
        ["cv", "--data", "/nonexistent", "--out", str(tmp_path / "cv"), "--folds", "1"], capsys)
    assert status == 2 and "--folds: expected a whole number of at least 2, got '1'" in err


class _nullcontext:
    value = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_every_command_help_prints_its_description_as_written(capsys):
    from pneumoscan.cli import COMMANDS

    helps = {}
    for verb in COMMANDS:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        helps[verb] = capsys.readouterr().out
        assert "%%" not in helps[verb], verb
    assert "with 95% intervals" in helps["evaluate"]
    # Where decoded images are kept, and how to clear them, where a command keeps them.
    for verb in COMMANDS:
        assert ("$PNEUMOSCAN_CACHE" in helps[verb]) == (verb in (
            "train", "cv", "eda", "evaluate", "compare", "report", "demo")), verb


def test_help_does_not_wait_for_torch_or_scikit_learn():
    # Building the parser (``pneumoscan --help``, any usage error) imports the command modules;
    # the heavy libraries load only when a command runs.
    import subprocess
    import sys

    code = ("import sys; from pneumoscan.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'sklearn', 'scipy', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_startup_benchmark_times_each_command(trained_run, synthetic_data, capsys):

    bench = load_benchmark("cli_startup")
    image = next((synthetic_data / "test").rglob("*.png"))
    assert bench.main(["--run", str(trained_run), "--image", str(image), "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["wall_s"]) == {"python", "import torch", "import torch, timm",
                                     "import sklearn.metrics", "pneumoscan --help",
                                     "pneumoscan predict (one image)"}
    assert all(seconds > 0 for seconds in result["wall_s"].values())
    assert result["first_wall_s"] == result["wall_s"]  # one run each: the first is the best
    assert result["command"].startswith("python benchmarks/cli_startup.py --run ")


def test_seeds_write_a_summary(synthetic_data, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert (
        main(
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
                "1",
                "--seeds",
                "0,1",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((out / "seeds_summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    acc = summary["test"]["accuracy"]
    assert acc["min"] <= acc["mean"] <= acc["max"]
    # Its brackets hold the range over seeds, not an interval as in the tables above them.
    printed = capsys.readouterr().out
    assert "test over seeds 0, 1: mean +- standard deviation [lowest, highest]" in printed
    assert f"[{acc['min']:.3f}, {acc['max']:.3f}]" in printed
    assert (out / "seed-0" / "model.json").exists() and (out / "seed-1" / "model.json").exists()


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out
    assert (tmp_path / "demo" / "evaluate.json").exists()
    # A second demo replaces its own earlier run (train refuses a folder that holds a run)...
    first = (tmp_path / "demo" / "run" / "model.safetensors").read_bytes()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2"]) == 0
    assert (tmp_path / "demo" / "run" / "model.safetensors").read_bytes() != first
    assert len((tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # ...but not one holding anything else: a user's notes are theirs.
    (tmp_path / "demo" / "run" / "my-notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "demo" / "run" / "my-notes.txt").read_text() == "mine"


def test_demo_never_writes_into_a_users_data_or_deletes_their_run(synthetic_data, tmp_path,
                                                                   capsys):
    """A --out whose data/ held the user's own images got the synthetic set mixed into them,
    and the user's run trained on them was deleted as if it were an earlier demo's."""
    import shutil

    data = Path(shutil.copytree(synthetic_data, tmp_path / "proj" / "data"))
    (data / "SYNTHETIC.txt").unlink()  # the user's own images, as far as the demo can tell
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    run = tmp_path / "proj" / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "seed_cnn",
                 "--image-size", "32", "--epochs", "1", "--quiet"]) == 0
    weights = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "proj"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the demo's synthetic data" in err, err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert (run / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.exists(), reason="real data not beside the project")
def test_learns_the_real_signal(tmp_path):
    """A short run at low resolution on the real X-rays reaches a validation ROC AUC >= 0.90."""
    out = tmp_path / "real"
    argv = ["train", "--data", str(REAL_DATA), "--out", str(out), "--recipe", "cpu",
            "--model", "resnet18", "--image-size", "32", "--epochs", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    validation = read_meta(out)["validation"]
    assert validation["roc_auc"] >= 0.90, validation
    assert np.isfinite(validation["loss"])


def test_evaluate_warns_when_the_data_is_the_run_own_training_data(synthetic_data, tmp_path,
                                                                     capsys, monkeypatch,
                                                                     trained_run):
    import shutil

    data = Path(shutil.copytree(synthetic_data / "train", tmp_path / "xrays"))  # no test/
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "seed_cnn",
                 "--image-size", "32", "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    # Named another way (relative, from elsewhere): still the same folder.
    monkeypatch.chdir(tmp_path)
    n = len(list(data.rglob("*.png")))
    assert main(["evaluate", str(run), "--data", "xrays", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{n} of {n} images are images {run} was trained or validated on" in err
    assert "optimistic" in err
    # A copy of them under another name is known by its pixels: it was scored as new data.
    other = shutil.copytree(data, tmp_path / "other")
    assert main(["evaluate", str(run), "--data", str(other), "--quiet"]) == 0
    assert f"{n} of {n} images are images" in capsys.readouterr().err
    # A source whose test/ split is what gets evaluated: no warning.
    assert main(["evaluate", str(run), "--data", str(synthetic_data), "--quiet"]) == 0
    assert "optimistic" not in capsys.readouterr().err
    # Digests a newer decoder no longer matches: the training folder is still known by path.
    from pneumoscan.seen import save_training_images

    save_training_images(run, 32, [bytes([i]) * 16 for i in range(3)])
    assert main(["evaluate", str(run), "--data", "xrays", "--quiet"]) == 0
    assert "holds the images" in capsys.readouterr().err
    # A digest file cut short (an interrupted copy): no traceback, the folder check stands.
    (run / "training_images.npz").write_bytes(b"PK\x03\x04" + bytes(300))
    assert main(["evaluate", str(run), "--data", "xrays", "--quiet"]) == 0
    assert "holds the images" in capsys.readouterr().err
    # A run made before runs kept their images' digests: its training folder is still known.
    (run / "training_images.npz").unlink()
    assert main(["evaluate", str(run), "--data", "xrays", "--quiet"]) == 0
    assert "holds the images" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--data", str(other), "--quiet"]) == 0
    assert "optimistic" not in capsys.readouterr().err
    # A run trained on DATA (train/ and test/): DATA/train is its training data, DATA/test not.
    assert _warned_as_training_data(trained_run, synthetic_data / "train", capsys)
    assert not _warned_as_training_data(trained_run, synthetic_data / "test", capsys)
    # Without --data: the test split of the data the run was trained on, where there is one.
    out = tmp_path / "own.json"
    assert main(["evaluate", str(trained_run), "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["n"] == 30  # the synthetic test/ split
    captured = capsys.readouterr()
    assert str(synthetic_data / "test") in captured.out and "since" not in captured.err
    assert main(["evaluate", str(run), "--quiet"]) == 2  # xrays/ has no test/: nothing held out
    err = capsys.readouterr().err
    assert "has no test/ split to score; give --data DIR" in err and "Traceback" not in err
    # A test/ added since the run trained: scored, with a warning that the data changed.
    shutil.copytree(synthetic_data / "test", data / "test")
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert "were added, removed or resized since" in capsys.readouterr().err
    shutil.rmtree(data)
    assert main(["evaluate", str(run), "--quiet"]) == 2
    assert "is not there; give --data DIR" in capsys.readouterr().err


def _warned_as_training_data(run, data, capsys) -> bool:
    """Whether ``evaluate RUN --data DATA`` warns that DATA holds the run's training images."""
    assert main(["evaluate", str(run), "--data", str(data), "--quiet"]) == 0
    return "optimistic" in capsys.readouterr().err


def test_the_training_folder_reached_another_way_still_warns(trained_run, synthetic_data,
                                                             tmp_path, capsys):
    # Another mount of the same folder here; on macOS, the same folder typed in another case.
    # Both are the same folder to the file system, not to a comparison of path strings.
    import subprocess

    other = tmp_path / "mounted"
    other.mkdir()
    if subprocess.run(["mount", "--bind", str(synthetic_data), str(other)],
                      capture_output=True).returncode:
        pytest.skip("cannot bind-mount a folder here")
    try:
        assert _warned_as_training_data(trained_run, other / "train", capsys)
        assert not _warned_as_training_data(trained_run, other / "test", capsys)
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


def test_evaluate_without_data_takes_the_medmnist_file_the_run_trained_on():
    from pneumoscan.commands.evaluate import own_test_data

    meta = {"data_source": "PneumoniaMNIST 128 px (/cache/pneumoniamnist_128.npz)"}
    assert own_test_data("run", meta) == "pneumoniamnist:128"


@pytest.mark.parametrize("argv, unbuffered", [
    (["models"], True),  # print() fails at once
    ([], False),  # argparse's help is buffered (argparse ignores its own write errors)
])
def test_a_reader_that_closed_the_pipe_gets_no_traceback(argv, unbuffered):
    # `pneumoscan models | head`: head exits early. The output pipe's reading end is closed
    # before the command starts, so every write to it fails.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "pneumoscan", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1  # the output could not be written: not an error of the input
    assert done.stderr.decode() == ""


def test_the_executable_exits_with_the_command_status_and_skips_the_exit_sweep(monkeypatch):
    # Both `pneumoscan` and `python -m pneumoscan` end through console_main, which freezes the
    # collector (so Python's exit does not sweep every object of torch and a run for cycles)
    # and exits with the command's status.
    from importlib.metadata import entry_points

    import pneumoscan.cli as cli

    (script,) = entry_points(group="console_scripts", name="pneumoscan")
    assert script.value == "pneumoscan.cli:console_main"
    assert "console_main()" in Path(cli.__file__).with_name("__main__.py").read_text()

    calls = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    assert exited.value.code == 3
    assert calls == ["main", "freeze"]


def test_a_file_name_the_console_cannot_encode_is_printed_escaped(trained_run, synthetic_data,
                                                                  tmp_path):
    # A Windows console, or a log redirected there, takes a code page: a name outside it must
    # not end `predict` with a traceback before the rest of the table is printed.
    import os
    import shutil
    import subprocess
    import sys

    source = next((synthetic_data / "test" / "NORMAL").iterdir())
    named = shutil.copy(source, tmp_path / f"\u80f8\u90e8-\u00e9{source.suffix}")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", str(trained_run),
                           str(named), str(source)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "\\u80f8\\u90e8-\\xe9" in done.stdout and source.name in done.stdout


def test_the_written_file_is_flushed_through_a_writable_handle(tmp_path, monkeypatch):
    # Windows flushes a file to disk only through a handle that may write (FlushFileBuffers):
    # fsync on a read-only one fails there with "Bad file descriptor".
    fcntl = pytest.importorskip("fcntl")
    import errno
    import os

    import pneumoscan.fileio as fileio

    real_fsync = os.fsync

    def fsync_as_windows_does(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync_as_windows_does)
    fileio.atomic_write_text(tmp_path / "config.json", "{}\n")
    assert (tmp_path / "config.json").read_text() == "{}\n"


def test_every_option_with_a_default_says_it_in_help():
    # The README promises `pneumoscan COMMAND --help` lists every option with its default.
    import argparse

    from pneumoscan.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb, sub in verbs.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS):
                continue
            if action.default is False:
                continue  # a flag
            shown = formatter._get_help_string(action) if action.help else ""
            assert "default" in shown, (verb, action.option_strings)


@pytest.mark.parametrize("own", ["model.json", "config.json", "test_metrics.json"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_output_over_one_of_the_runs_own_files_is_refused(command, own, trained_run,
                                                            synthetic_data, tmp_path, capsys):
    """predict --output and evaluate --json wrote over model.json (exit 0), and the run no
    longer loaded."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    target = run / own
    image = next((synthetic_data / "test").rglob("*.png"))
    argv = (["predict", str(run), str(image), "--output", str(target)] if command == "predict"
            else ["evaluate", str(run), "--json", str(target)])
    status, err = _exit_status_and_err([*argv, "--quiet"], capsys)
    option = argv[-2]
    assert status == 2
    assert err == f"pneumoscan {command}: error: {option} {target}: is one of the run's own " \
                  "files; name a new file"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A file of the user's own beside them is written, and written again.
    mine = run / "mine.json"
    argv = (["predict", str(run), str(image), "--output", str(mine)] if command == "predict"
            else ["evaluate", str(run), "--json", str(mine)])
    for _ in range(2):
        assert main([*argv, "--quiet"]) == 0 and json.loads(mine.read_text())


def test_evaluate_json_where_it_cannot_be_written_fails_before_the_work(trained_run, tmp_path,
                                                                       capsys):
    """The figures were computed and printed first, then the write failed."""
    import subprocess

    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    status = main(["evaluate", str(trained_run), "--json", str(afile / "x.json"), "--quiet"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.strip() == (f"pneumoscan evaluate: error: {afile}: exists and is not "
                                    "a folder")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)],
                      capture_output=True).returncode != 0:
        return  # cannot mount here: the case above stands
    try:
        status = main(["evaluate", str(trained_run), "--json", str(readonly / "a" / "x.json"),
                       "--quiet"])
        captured = capsys.readouterr()
        assert status == 2 and captured.out == ""
        assert captured.err.strip() == (f"pneumoscan evaluate: error: {readonly}: Read-only "
                                        "file system")
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)


def test_evaluate_json_leaves_nothing_when_refused_and_blames_no_file_for_the_work(
        trained_run, tmp_path, capsys, monkeypatch):
    """Run inside the --json file's write, the work's errors that named no file were said as
    the --json file's, and a refused run left the folders made for it."""
    import errno

    from pneumoscan.data import dataset

    out = tmp_path / "new" / "sub" / "x.json"
    assert main(["evaluate", str(tmp_path / "no-run"), "--json", str(out), "--quiet"]) == 2
    assert "no-run" in capsys.readouterr().err and not (tmp_path / "new").exists()

    def too_many(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dataset, "load_eval_split", too_many)
    assert main(["evaluate", str(trained_run), "--json", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "pneumoscan evaluate: error: Too many open files"
    assert not (tmp_path / "new").exists()


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    """'File exists' (making the folder) and 'Not a directory' (entering it) said the same
    thing two ways, each naming another path."""
    import errno

    from pneumoscan.cli import _file_in_the_way

    afile = tmp_path / "afile"
    afile.write_text("")
    made = FileExistsError(errno.EEXIST, "File exists", str(afile))
    entered = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(afile / "x" / "y.png"))
    assert _file_in_the_way(made) == _file_in_the_way(entered) == str(afile)
    assert _file_in_the_way(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None
    assert _file_in_the_way(PermissionError(errno.EACCES, "Permission denied", str(afile))) is None


def test_eda_failing_half_way_leaves_the_earlier_edas_files_whole(synthetic_data, tmp_path,
                                                                  monkeypatch, capsys):
    """A full disk at eda's second figure left the new class_balance.png beside the earlier
    run's table and grid; and an --out that cannot be written was found after the decoding."""
    import errno

    import pneumoscan.plots as plots

    out = tmp_path / "eda"
    argv = ["eda", "--data", str(synthetic_data), "--out", str(out), "--image-size", "32",
            "--quiet"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "sample_grid.png"))

    monkeypatch.setattr(plots, "sample_grid", full)
    assert main(argv[:-2] + ["64", "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging left either
    assert f"{out / 'sample_grid.png'}: No space left on device" in capsys.readouterr().err
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the output was checked")

    monkeypatch.setattr("pneumoscan.data.dataset.load_data", no_decoding)
    assert main(["eda", "--data", str(synthetic_data), "--out", str(blocker / "eda")]) == 2
    assert "a-file" in capsys.readouterr().err
