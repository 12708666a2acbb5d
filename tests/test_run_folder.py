"""A new run never lands on top of an earlier one, and what the disk refuses is one line."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), "--recipe", "cpu", "--model",
                 "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_into_a_folder_that_holds_a_run_is_refused_and_changes_nothing(
        trained_run, synthetic_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = _snapshot(out)
    assert _train(synthetic_data, out, "--epochs", "3") == 2
    err = _one_line(capsys)
    assert "already holds a run (model.json)" in err and "--resume" in err
    assert _snapshot(out) == before


def test_seed_runs_in_the_folder_count_as_a_run(synthetic_data, tmp_path, capsys):
    (tmp_path / "runs" / "seed-1").mkdir(parents=True)
    (tmp_path / "runs" / "seed-1" / "checkpoint.pt").write_bytes(b"")
    assert _train(synthetic_data, tmp_path / "runs", "--seeds", "0,1") == 2
    assert "already holds a run (seed-1/checkpoint.pt)" in _one_line(capsys)


def test_an_empty_folder_or_one_with_other_files_takes_a_run(synthetic_data, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "plan.txt").write_text("keep me")
    assert _train(synthetic_data, tmp_path / "notes") == 0
    assert (tmp_path / "notes" / "plan.txt").read_text() == "keep me"
    assert (tmp_path / "notes" / "model.json").is_file()


@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_folder_holding_files_of_a_runs_names_but_no_run_is_refused(command, synthetic_data,
                                                                       tmp_path, capsys):
    """A user's own config.json, plots/ and test_metrics.json were replaced without a word."""
    out = tmp_path / "mine"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "roc_val.png").write_bytes(b"my figure")
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "test_metrics.json").write_text("{}")
    before = _snapshot(out)
    argv = [command, "--data", str(synthetic_data), "--out", str(out), "--recipe", "cpu",
            "--model", "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet"]
    assert main(argv + (["--folds", "2"] if command == "cv" else [])) == 2
    assert _one_line(capsys).endswith(
        f"--out {out}: holds config.json, plots/, test_metrics.json, which a run would "
        "replace; choose another --out, or move them first")
    assert _snapshot(out) == before
    # A config.json a run wrote, and nothing else, is a run stopped before its first checkpoint.
    shutil.rmtree(out)
    out.mkdir()
    (out / "config.json").write_text('{"pneumoscan": "0.1.0", "model": "seed_cnn"}')
    assert _train(synthetic_data, out) == 0 and (out / "model.json").is_file()


def test_seeds_take_the_folder_past_a_users_files_and_warn_once(synthetic_data, tmp_path,
                                                                capsys):
    # train --seeds writes OUT/seed-N/ and a summary: a user's OUT/config.json is in no run's
    # way, while one in OUT/seed-0/ is. What the data loses is said once, not once a seed.
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    shutil.copytree(data / "train" / "NORMAL", data / "train" / "NORMAL_old")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    assert _train(data, out, "--seeds", "0,1") == 0
    assert (out / "config.json").read_text() == '{"my": "settings"}'
    assert capsys.readouterr().err.count("not read, being outside the class folders") == 1
    other = tmp_path / "other"
    (other / "seed-0" / "plots").mkdir(parents=True)
    assert _train(data, other, "--seeds", "0,1") == 2
    assert _one_line(capsys).endswith(f"--out {other}: holds seed-0/plots/, which a run would "
                                      "replace; choose another --out, or move them first")
    # Resumed, the seeds that have no run yet are still checked; a summary of one's own, too.
    shutil.copytree(out / "seed-0", other / "seed-0", dirs_exist_ok=True)
    (other / "seed-1" / "plots").mkdir(parents=True)
    assert _train(data, other, "--seeds", "0,1", "--resume") == 2
    assert "holds seed-1/plots/, which a run would replace" in _one_line(capsys)
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "seeds_summary.json").write_text("{}")
    assert _train(data, tmp_path / "third", "--seeds", "0,1") == 2
    assert "holds seeds_summary.json, which a run" in _one_line(capsys)


@pytest.mark.parametrize("command", ["train", "cv", "stack"])
def test_an_out_that_is_a_file_or_under_one_is_refused(command, synthetic_data, trained_run,
                                                       tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    head = {"train": ["train", "--data", str(synthetic_data)],
            "cv": ["cv", "--data", str(synthetic_data)],
            "stack": ["stack", str(trained_run)]}[command]
    assert main([*head, "--out", str(afile)]) == 2
    assert f"--out {afile}: exists and is not a folder" in _one_line(capsys)
    assert main([*head, "--out", str(afile / "run")]) == 2
    assert f"{afile} is a file, not a folder" in _one_line(capsys)


def test_a_refused_resume_leaves_the_run_config_as_it_was(synthetic_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(synthetic_data, out) == 0
    capsys.readouterr()
    config = (out / "config.json").read_text()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _train(synthetic_data, out, "--epochs", "4", "--resume") == 2
    assert "checkpoint.pt" in _one_line(capsys)
    assert (out / "config.json").read_text() == config


def test_a_run_refused_for_its_data_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "data" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "NORMAL" / "x.jpeg").write_bytes(b"not an image")
    assert _train(tmp_path / "data", tmp_path / "run") == 2
    capsys.readouterr()
    assert not (tmp_path / "run").exists()


def test_what_the_system_refuses_to_write_is_one_line(monkeypatch, capsys):
    import pneumoscan.commands.models as models

    def refused(args):
        raise PermissionError(13, "Permission denied", "runs/x/config.json")

    monkeypatch.setattr(models, "run", refused)
    assert main(["models"]) == 2
    assert _one_line(capsys) == ("pneumoscan models: error: runs/x/config.json: "
                                 "Permission denied")


def test_an_interrupted_train_says_how_to_continue(monkeypatch, synthetic_data, tmp_path,
                                                   capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pneumoscan.pipeline.train_run", interrupted)
    # Stopped before its first checkpoint: there is nothing for --resume to continue.
    assert _train(synthetic_data, tmp_path / "run") == 130
    assert _one_line(capsys) == "pneumoscan train: interrupted"
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert _train(synthetic_data, tmp_path / "run", "--resume") == 130
    assert "interrupted; the same command with --resume continues" in _one_line(capsys)
    # Under torchrun Ctrl-C reaches every process: rank 0 alone says so.
    monkeypatch.setenv("RANK", "1")
    assert _train(synthetic_data, tmp_path / "run", "--resume") == 130
    assert capsys.readouterr().err == ""


def test_seed_and_seeds_together_are_refused(synthetic_data, tmp_path, capsys):
    assert _train(synthetic_data, tmp_path / "run", "--seed", "3", "--seeds", "0,1") == 2
    assert "--seed and --seeds: give one of them" in _one_line(capsys)


def test_a_refused_write_names_the_file_asked_for_not_its_temporary(tmp_path, monkeypatch):
    import errno
    import tempfile

    from pneumoscan.fileio import atomic_write, atomic_write_text

    target = tmp_path / "config.json"

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".config.tmp"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(OSError) as refused:
            atomic_write_text(target, "{}")
    assert refused.value.filename == str(target) and refused.value.strerror == "Permission denied"

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")  # names no file

    with pytest.raises(OSError) as full:
        atomic_write(target, disk_full)
    assert full.value.filename == str(target) and full.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_without_out_each_run_gets_a_new_folder(synthetic_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        assert main(["train", "--data", str(synthetic_data), "--recipe", "cpu", "--model",
                     "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet"]) == 0
        assert f"run directory: runs/run-{n} (--out chooses another)" in capsys.readouterr().out
        assert (tmp_path / "runs" / f"run-{n}" / "model.json").is_file()
    assert main(["train", "--data", str(synthetic_data), "--resume"]) == 2
    assert "--resume: give --out" in _one_line(capsys)


def test_a_folder_with_epochs_but_no_checkpoint_is_not_offered_resume(synthetic_data, tmp_path,
                                                                        capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # a GPU run stopped before its checkpoint
    assert _train(synthetic_data, tmp_path / "run") == 2
    err = _one_line(capsys)
    assert "already holds a run (metrics.jsonl)" in err and "--resume" not in err


def test_resume_without_a_checkpoint_leaves_a_finished_run_alone(trained_run, synthetic_data,
                                                                 tmp_path, capsys):
    """A cv output, or a run whose checkpoint is gone, has nothing to resume: --resume must not
    train a new run into it (it used to, turning a cv ensemble into a mixed folder)."""
    out = shutil.copytree(trained_run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()
    before = _snapshot(out)
    assert _train(synthetic_data, out, "--resume") == 2
    assert "no checkpoint.pt to resume from" in _one_line(capsys)
    assert _snapshot(out) == before


def test_runs_started_together_without_out_take_different_folders(tmp_path):
    from pneumoscan.run_folder import new_run_folder

    made = [new_run_folder(tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["run-1", "run-2", "run-3"]
    assert all(p.is_dir() for p in made)  # claimed at once: a second run cannot take it


def test_a_refused_run_without_out_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "missing" in _one_line(capsys)
    assert not (tmp_path / "runs" / "run-1").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the processes need one --out
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--data", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "under torchrun, give --out" in _one_line(capsys)


def test_resume_of_an_interrupted_run_without_a_checkpoint_yet_starts_over(synthetic_data,
                                                                           tmp_path, capsys):
    # On a GPU a checkpoint is written every 30 s: a run killed before has epochs and no
    # checkpoint, and --resume starts it from epoch 1 rather than refusing the folder.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert _train(synthetic_data, tmp_path / "run", "--resume") == 0
    assert "starting from epoch 1" in capsys.readouterr().out


def test_a_full_disk_while_saving_weights_or_checkpoint_is_an_oserror_naming_it(small_disk):
    # torch.save given a path and safetensors' save_file report a full disk as errors of their
    # own (a traceback at the command line); save_file also left a temporary file of its own.
    import errno

    from pneumoscan.checkpoint import _save
    from pneumoscan.fileio import atomic_write
    from pneumoscan.model_io import save_model
    from pneumoscan.models import create_model

    model = create_model("seed_cnn", in_chans=3, image_size=32)  # some 2 MB of weights
    meta = {"architecture": "seed_cnn", "image_size": 32, "in_chans": 3,
            "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 1.0,
            "class_names": ["NORMAL", "PNEUMONIA"]}
    with pytest.raises(OSError) as full:
        save_model(small_disk / "run", model, meta)
    assert full.value.errno == errno.ENOSPC
    assert full.value.filename == str(small_disk / "run" / "model.safetensors")
    with pytest.raises(OSError) as full:
        atomic_write(small_disk / "checkpoint.pt", lambda tmp: _save(model.state_dict(), tmp))
    assert full.value.errno == errno.ENOSPC
    assert full.value.filename == str(small_disk / "checkpoint.pt")
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == []


def test_ctrl_c_while_a_checkpoint_is_written_is_the_interrupt_and_leaves_no_file(
        tmp_path, monkeypatch):
    """torch's writer turned a Ctrl-C in the middle of a write into a RuntimeError ("unexpected
    pos") as it closed the file: the command printed a traceback and exited 1, not 130."""
    from pneumoscan import checkpoint
    from pneumoscan.fileio import atomic_write

    writes = [0]
    real_write = checkpoint._RecordingWriter.write

    def interrupted(self, data):
        writes[0] += 1
        if writes[0] == 3:
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._RecordingWriter, "write", interrupted)
    state = {"a": torch.zeros(1000), "b": torch.ones(100_000)}
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "checkpoint.pt", lambda tmp: checkpoint._save(state, tmp))
    assert writes[0] == 3 and list(tmp_path.iterdir()) == []


def test_a_full_disk_while_the_demo_writes_its_images_names_the_file(small_disk, capsys):
    assert main(["demo", "--out", str(small_disk / "demo")]) == 2
    err = _one_line(capsys)
    assert "No space left on device" in err and f"{small_disk / 'demo' / 'data'}{os.sep}" in err
    assert "partial" not in err, err
    assert not [p for p in small_disk.rglob("*") if p.is_file()]  # staged images gone too


def test_outputs_beside_runs_are_refused_only_where_they_would_replace_a_run_file(tmp_path):
    from pneumoscan.run_folder import refuse_own_file

    run, seeds, other = tmp_path / "run", tmp_path / "seeds", tmp_path / "other"
    for folder in (run, other, seeds / "seed-0"):
        folder.mkdir(parents=True)
        (folder / "model.json").write_text("{}")
    # Another run's own file, whether it exists yet or not: refused.
    for name in ("model.json", "test_metrics.json"):
        with pytest.raises(PneumoscanError, match="is a file of the run in"):
            refuse_own_file(run, other / name, "--json")
    # A folder of seed runs is no run: a new file there is fine, its summary is not.
    refuse_own_file(run, seeds / "test_metrics.json", "--json")
    (seeds / "seeds_summary.json").write_text("{}")
    with pytest.raises(PneumoscanError, match="is a file of the run in"):
        refuse_own_file(run, seeds / "seeds_summary.json", "--json")
