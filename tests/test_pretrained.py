"""Starting a backbone from pretrained weights: a local file, or a clear refusal offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from pneumoscan.errors import PneumoscanError
from pneumoscan.models import create_model

timm = pytest.importorskip("timm")


def test_local_weights_file_is_loaded_and_folded_to_one_channel(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)  # ImageNet layout: 3 ch, 1000 classes
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model("resnet18", in_chans=1, pretrained=str(path))
    folded = source.conv1.weight.sum(dim=1, keepdim=True)  # timm's RGB -> gray folding
    assert torch.allclose(model.conv1.weight, folded, atol=1e-6)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.out_features == 2  # a fresh two-class head


def test_unreadable_weights_file_is_one_line(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not weights at all")
    with pytest.raises(PneumoscanError, match="not a weights file timm can read") as e:
        create_model("resnet18", in_chans=1, pretrained=str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(PneumoscanError, match="not found"):
        create_model("resnet18", in_chans=1, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("kind", ["empty", "prefixed", "another network"])
def test_a_file_that_does_not_fit_is_refused_not_trained_from_scratch(kind, tmp_path, capfd):
    """timm loads leniently when the classifier is replaced: a file of another network, or with
    its names prefixed, loaded nothing, and the run trained from random weights with exit 0."""
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t" if kind == "another network" else "resnet18")
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    if kind == "empty":
        weights = {"unrelated": torch.zeros(1)}
    elif kind == "prefixed":
        weights = {f"model.{k}": v for k, v in weights.items()}
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with pytest.raises(PneumoscanError, match="does not fit") as e:
        create_model("resnet18", in_chans=1, pretrained=str(path))
    assert "\n" not in str(e.value)
    # Only the refusal: not timm's list of every key it did not expect, kilobytes long.
    assert "Unexpected keys" not in capfd.readouterr().err


def test_a_key_another_networks_loader_needs_is_named_in_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet10t.safetensors"
    source = timm.create_model("resnet10t")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(PneumoscanError, match="the file has no tensor 'fc.weight' that its "
                                              "loader needs"):
        create_model("convnext_atto", in_chans=1, pretrained=str(path))


def test_offline_download_fails_at_once(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    # The refusal comes from the reachability check, before any download could hang.
    with pytest.raises(PneumoscanError, match="--pretrained PATH") as e:
        create_model("resnet18", in_chans=1, pretrained="timm")
    assert "model.safetensors of huggingface.co/timm/resnet18." in str(e.value)  # what to fetch


def test_seed_cnn_refuses_pretrained(tmp_path, synthetic_data, capsys):
    from pneumoscan.cli import main

    status = main(["train", "--data", str(synthetic_data), "--out", str(tmp_path / "r"),
                   "--model", "seed_cnn", "--pretrained", "x.pth", "--quiet"])
    assert status == 2
    assert "timm backbones" in capsys.readouterr().err


def test_a_run_started_from_pretrained_weights_resumes_without_them(tmp_path, synthetic_data,
                                                                    capsys):
    """The checkpoint holds the weights: a resume needs neither the file (deleted since) nor the
    network, and may leave --pretrained out."""
    from safetensors.torch import save_file

    from pneumoscan.cli import main

    source = timm.create_model("resnet10t", pretrained=False)
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    common = ["train", "--data", str(synthetic_data), "--out", str(run), "--recipe", "quick",
              "--image-size", "32", "--epochs", "1", "--quiet"]
    assert main([*common, "--pretrained", str(weights)]) == 0
    weights.unlink()
    for extra in ([], ["--pretrained", str(weights)]):
        assert main([*common, "--resume", *extra]) == 0, capsys.readouterr().err


def test_weights_of_another_network_say_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(PneumoscanError) as e:
        create_model("resnet10t", in_chans=1, pretrained=str(path))
    message = str(e.value)
    # Before: "...: Error(s) in loading state_dict for ResNet:" and nothing more.
    assert message.startswith(f"{path}: cannot load pretrained weights for 'resnet10t'")
    assert "does not fit this network (size mismatch for " in message and "\n" not in message


def test_a_weights_file_that_does_not_fit_is_refused_before_out_is_touched(
        tmp_path, synthetic_data, capsys, monkeypatch):
    """The file was read only once the images had decoded, after config.json was written
    (over a file of that name already in --out)."""
    from pneumoscan.cli import main
    from pneumoscan.data import background

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(background, "read_splits", no_decoding)
    junk = tmp_path / "notes.txt"
    junk.write_text("not weights")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("mine")
    status = main(["train", "--data", str(synthetic_data), "--out", str(out), "--recipe",
                   "quick", "--image-size", "32", "--epochs", "1", "--quiet",
                   "--pretrained", str(junk)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "notes.txt: not a weights file timm can read" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "mine"


def test_published_weights_already_in_the_hub_cache_are_used_offline(tmp_path):
    """timm reads its published weights from the Hugging Face cache without the network: the
    offline refusal must not stand in its way. Run in a child process, where HF_HOME is read
    as huggingface_hub is imported, with every connection refused."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    hub_id = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id  # 'timm/resnet10t.c3_in1k'
    repo = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    source = timm.create_model("resnet10t")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(snapshot / "model.safetensors"))
    child = f"""
import socket
from pathlib import Path
def refuse(*args, **kwargs):
    raise OSError("network unreachable")
socket.create_connection = refuse
socket.socket.connect = lambda *a, **k: refuse()
import torch
from safetensors.torch import load_file
from pneumoscan.config import check_pretrained
from pneumoscan.models import create_model
check_pretrained("resnet10t", "timm", source=True)
model = create_model("resnet10t", in_chans=1, pretrained=True)
cached = load_file({str(snapshot / "model.safetensors")!r})
assert torch.equal(model.layer1[0].conv1.weight, cached["layer1.0.conv1.weight"])
print("loaded from the cache")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded from the cache" in done.stdout


def test_weights_published_by_url_are_looked_for_in_torch_hubs_cache(tmp_path, monkeypatch):
    """A few older families (legacy_seresnet, gcvit) are published by URL, not on the Hugging
    Face hub: offline, weights already in torch.hub's cache were refused as unreachable."""
    from urllib.parse import urlsplit

    import torch.hub

    from pneumoscan.models.timm_models import require_published_weights

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    url = timm.models.get_pretrained_cfg("legacy_seresnet18").url
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PneumoscanError, match=f"cannot reach {urlsplit(url).hostname}") as e:
        require_published_weights("legacy_seresnet18")
    assert url in str(e.value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / Path(urlsplit(url).path).name).write_bytes(b"cached")
    require_published_weights("legacy_seresnet18")  # found in the cache: no refusal
