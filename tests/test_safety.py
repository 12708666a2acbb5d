"""Safe model files: nothing a run directory holds can run code, and damage is one clear line.

A planted pickle as checkpoint.pt, weights that are not safetensors, and a hostile or malformed
model.json are each refused with one line naming the file (exit 2); the source never unpickles.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.model_io import read_meta, validate_meta

SRC = Path(__file__).resolve().parents[1] / "src" / "pneumoscan"


class _Payload:
    """Unpickling this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_checkpoint(path: Path, marker: Path, *, torch_format: bool) -> Path:
    state = {"config": _Payload(marker), "epoch": 1}
    if torch_format:
        torch.save(state, path)  # a torch zip file whose data.pkl calls os.system
    else:
        path.write_bytes(pickle.dumps(state))  # a bare pickle, torch's legacy format
    return path


def one_line_error(capsys, status: int) -> str:
    captured = capsys.readouterr()
    assert status == 2, captured.err
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared trained run, free to tamper with."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def resume_argv(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--recipe", "cpu", "--model",
            "seed_cnn", "--image-size", "32", "--epochs", "2", "--device", "cpu", "--resume",
            "--quiet"]


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: the planted file is dangerous when loaded the unsafe way."""
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker, torch_format=False)
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "bare-pickle"])
def test_resume_refuses_a_planted_pickle(torch_format, synthetic_data, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    malicious_checkpoint(out / "checkpoint.pt", marker, torch_format=torch_format)
    err = one_line_error(capsys, main(resume_argv(synthetic_data, out)))
    assert "checkpoint.pt" in err and "refused" in err and "could run code" in err
    assert not marker.exists()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not a readable checkpoint"),
        (b"<html>not a checkpoint</html>" * 10, "refused to load checkpoint: corrupt"),
        ("state_dict", "not a pneumoscan checkpoint"),
        ("list", "not a pneumoscan checkpoint"),
        ("bad_config", "not a pneumoscan checkpoint"),
    ],
    ids=["empty", "html", "plain-state-dict", "list", "config-not-json"],
)
def test_resume_refuses_a_broken_checkpoint(content, reason, synthetic_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    if content == "state_dict":
        torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "bad_config":
        keys = ("config", "epoch", "model", "optimizer", "scheduler", "early_stopping",
                "history")
        torch.save({k: "{not json" for k in keys}, path)
    else:
        path.write_bytes(content)
    err = one_line_error(capsys, main(resume_argv(synthetic_data, out)))
    assert str(path) in err and reason in err


@pytest.mark.parametrize("kind", ["pickle", "junk", "empty", "other-tensors"])
def test_evaluate_refuses_weights_that_are_not_this_models(
    kind, run_copy, synthetic_data, tmp_path, capsys
):
    weights, marker = run_copy / "model.safetensors", tmp_path / "pwned"
    if kind == "pickle":
        weights.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    elif kind == "junk":
        weights.write_bytes(os.urandom(4096))
    elif kind == "empty":
        weights.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"head.weight": torch.zeros(3, 3)}, str(weights))
    status = main(["evaluate", str(run_copy), "--data", str(synthetic_data), "--device", "cpu",
                   "--quiet"])
    err = one_line_error(capsys, status)
    assert "model.safetensors" in err
    assert not marker.exists()


def _good_meta() -> dict:
    return {
        "format": "pneumoscan-model", "format_version": 1, "kind": "single",
        "architecture": "seed_cnn", "image_size": 32, "in_chans": 3,
        "class_names": ["NORMAL", "PNEUMONIA"],
        "intensity": {"scale": 1 / 255, "mean": 0.0, "std": 1.0},
        "threshold": 0.5, "temperature": 1.0,
    }


def _ensemble(members) -> dict:
    meta = {k: v for k, v in _good_meta().items() if k not in ("architecture", "in_chans")}
    return {**meta, "kind": "ensemble", "members": members}


BAD_META = {
    "not-an-object": ([1, 2], "not a JSON object"),
    "missing-threshold": ({k: v for k, v in _good_meta().items() if k != "threshold"},
                          "missing 'threshold'"),
    "missing-architecture": ({k: v for k, v in _good_meta().items() if k != "architecture"},
                             "missing 'architecture'"),
    "threshold-string": ({**_good_meta(), "threshold": "0.5"}, "'threshold' has the wrong type"),
    "threshold-bool": ({**_good_meta(), "threshold": True}, "'threshold' has the wrong type"),
    "threshold-above-1": ({**_good_meta(), "threshold": 1.5}, "threshold must be within"),
    "threshold-nan": ({**_good_meta(), "threshold": float("nan")}, "threshold must be within"),
    "temperature-zero": ({**_good_meta(), "temperature": 0}, "temperature must be positive"),
    "temperature-inf": ({**_good_meta(), "temperature": float("inf")},
                        "temperature must be positive"),
    "image-size-float": ({**_good_meta(), "image_size": 32.0}, "'image_size' has the wrong type"),
    "image-size-huge": ({**_good_meta(), "image_size": 10**6}, "image_size must be within"),
    "in-chans-huge": ({**_good_meta(), "in_chans": 10**9}, "in_chans must be within"),
    "intensity-no-std": ({**_good_meta(), "intensity": {"mean": 0.0}}, "'intensity' needs"),
    "intensity-zero-std": ({**_good_meta(), "intensity": {"mean": 0.0, "std": 0}},
                           "'intensity' needs"),
    "unknown-kind": ({**_good_meta(), "kind": "bagging"}, "kind must be one of"),
    "wrong-format": ({**_good_meta(), "format": "keras"}, "is not supported"),
    "newer-version": ({**_good_meta(), "format_version": 99}, "is not supported"),
    "classes-swapped": ({**_good_meta(), "class_names": ["PNEUMONIA", "NORMAL"]},
                        "class_names must be"),
    "member-parent": (_ensemble(["../elsewhere"]), "needs 'members'"),
    "member-absolute": (_ensemble(["/etc"]), "needs 'members'"),
    "member-nested-slash": (_ensemble(["fold-0/../../x"]), "needs 'members'"),
    "member-backslash": (_ensemble(["..\\x"]), "needs 'members'"),
    "member-itself": (_ensemble(["."]), "needs 'members'"),
    "member-empty": (_ensemble([""]), "needs 'members'"),
    "member-not-string": (_ensemble([3]), "needs 'members'"),
    "no-members": (_ensemble([]), "needs 'members'"),
}


def test_the_good_meta_is_accepted():
    assert validate_meta(_good_meta(), "x/model.json")["threshold"] == 0.5
    assert validate_meta(_ensemble(["fold-0", "fold-1"]), "x/model.json")["kind"] == "ensemble"


@pytest.mark.parametrize("name", list(BAD_META))
def test_validate_meta_refuses(name):
    meta, reason = BAD_META[name]
    with pytest.raises(PneumoscanError) as info:
        validate_meta(meta, "some/run/model.json")
    message = str(info.value)
    assert message.startswith("some/run/model.json: invalid model.json")
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("name", ["missing-threshold", "unknown-kind", "member-parent",
                                  "temperature-inf", "member-itself"])
def test_evaluate_refuses_a_bad_model_json(name, run_copy, synthetic_data, capsys):
    meta, reason = BAD_META[name]
    (run_copy / "model.json").write_text(json.dumps(meta))
    status = main(["evaluate", str(run_copy), "--data", str(synthetic_data), "--device", "cpu",
                   "--quiet"])
    err = one_line_error(capsys, status)
    assert str(run_copy / "model.json") in err and reason in err


@pytest.mark.parametrize(
    "text", ["", "{not json", "\xff\xfe junk"], ids=["empty", "syntax", "bytes"]
)
def test_an_unparseable_model_json_is_one_line(text, run_copy):
    (run_copy / "model.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(PneumoscanError) as info:
        read_meta(run_copy)
    assert str(run_copy / "model.json") in str(info.value)
    assert "\n" not in str(info.value)


def _unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that could unpickle: torch.load without weights_only=True, pickle.load(s),
    numpy's allow_pickle=True."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if name.endswith("torch.load") and not (
            isinstance(flag, ast.Constant) and flag.value is True
        ):
            found.append((node.lineno, name))
        if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load"):
            found.append((node.lineno, name))
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append((node.lineno, f"{name}(allow_pickle=...)"))
    return found


def test_the_source_never_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{path.relative_to(SRC)}:{line}: {what}"
        for path in files
        for line, what in _unsafe_loads(ast.parse(path.read_text(), str(path)))
    ]
    assert not offenders, offenders


def test_the_unpickle_scan_catches_what_it_should():
    code = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
            "np.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\n")
    assert [line for line, _ in _unsafe_loads(ast.parse(code))] == [1, 2, 3, 4]
