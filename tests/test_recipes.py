"""Named recipes and augmentations: what each name resolves to, and the flags that override them."""

from __future__ import annotations

import dataclasses

import pytest

from pneumoscan.cli import build_parser
from pneumoscan.commands.train_options import config_from_args
from pneumoscan.config import AUGMENTATIONS, RECIPES, AugmentConfig, build_config
from pneumoscan.errors import PneumoscanError


def _train_config(*flags: str):
    args = build_parser().parse_args(["train", "--data", "somewhere", "--device", "cpu", *flags])
    return config_from_args(args)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_names_a_known_augmentation(recipe):
    name = RECIPES[recipe].get("augment", "report")
    cfg = build_config(recipe, "cpu", {})
    assert cfg.augment == AUGMENTATIONS[name]
    assert cfg.recipe == recipe


def test_the_report_augmentation_is_the_reports_and_the_default():
    assert AUGMENTATIONS["report"] == AugmentConfig(rotation_deg=30.0, zoom=0.2, shift=0.1)
    assert build_config("seed", "cpu", {}).augment == AUGMENTATIONS["report"]
    none = AUGMENTATIONS["none"]
    assert none.rotation_deg == none.zoom == none.shift == 0 and not none.hflip


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augment_flag_overrides_the_recipe(name):
    cfg = _train_config("--recipe", "seed", "--augment", name)
    assert cfg.augment == AUGMENTATIONS[name]
    # The resolved numbers, not the name, are what config.json keeps.
    assert cfg.to_dict()["augment"] == dataclasses.asdict(AUGMENTATIONS[name])


def test_unknown_augmentation_is_refused():
    with pytest.raises(PneumoscanError, match="unknown augmentation 'heavy'"):
        build_config("cpu", "cpu", {"augment": "heavy"})
    with pytest.raises(SystemExit) as exit_info:
        _train_config("--augment", "heavy")
    assert exit_info.value.code == 2


def test_quick_recipe_is_the_cpu_recipe_on_a_smaller_network_for_fewer_epochs():
    quick, cpu = build_config("quick", "cpu", {}), build_config("cpu", "cpu", {})
    assert (quick.model, cpu.model) == ("resnet10t", "resnet18")
    assert quick.epochs < cpu.epochs
    assert quick.image_size == cpu.image_size and quick.schedule == cpu.schedule
    assert quick.augment == cpu.augment == AUGMENTATIONS["light"]


def test_quick_recipes_network_is_registered():
    from pneumoscan.models import list_models

    assert "resnet10t" in list_models()


def test_resume_on_another_device_keeps_the_recipe_auto_chose(tmp_path, monkeypatch):
    """'auto' picks by device: a run started on a CPU (the cpu recipe) and resumed with
    --device cuda resolved to strong and was refused for changed settings, although --device
    may change on resume."""
    import json

    import torch

    import pneumoscan.device

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(build_config("cpu", "cpu", {}).to_dict()))
    (run / "checkpoint.pt").write_bytes(b"")  # there is one to resume from
    monkeypatch.setattr(pneumoscan.device, "resolve_device", lambda name: torch.device("cuda"))
    args = build_parser().parse_args(["train", "--data", "d", "--out", str(run), "--resume"])
    assert config_from_args(args).recipe == "cpu"
    new = build_parser().parse_args(["train", "--data", "d", "--out", str(tmp_path / "new")])
    assert config_from_args(new).recipe == "strong"  # a new run: auto by the device


def test_a_misspelt_override_is_refused_not_dropped():
    with pytest.raises(TypeError, match="epoch"):
        build_config("cpu", "cpu", {"epoch": 1})
