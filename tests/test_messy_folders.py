"""Data folders as downloads and copies leave them: loose files, links, stray names, copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from pneumoscan.data.dataset import load_data
from pneumoscan.data.decode import read_gray
from pneumoscan.data.discover import discover
from pneumoscan.errors import PneumoscanError, UnreadableImage
from pneumoscan.predict import expand_paths


def _gray(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


def _classes(root: Path, n: int = 12, seed: int = 0, named: bool = True) -> Path:
    """``n`` images of each class, each from its own Kermany-named patient (``named``)."""
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(n):
            name = f"person{label}{i:03d}_bacteria_{i}.png" if named else f"scan{i}.png"
            write_image(root / cls / name, _gray(seed + 1000 * label + i))
    return root


def test_image_files_beside_the_class_folders_are_named_not_lost(tmp_path, capsys):
    """PNEUMONIA images moved into test/ itself, beside NORMAL/, were dropped without a word:
    evaluate then scored the NORMAL images alone, accuracy 1.000."""
    _classes(tmp_path / "train")
    _classes(tmp_path / "test", seed=50)
    for path in sorted((tmp_path / "test" / "PNEUMONIA").iterdir())[:5]:
        path.rename(tmp_path / "test" / path.name)
    (tmp_path / "test" / "labels.csv").write_text("name,label\n")  # not an image: not named
    load_data(str(tmp_path), 40, progress=False)
    err = capsys.readouterr().err
    assert "not read, being outside the class folders: 5 image files in test/" in err, err
    assert "labels.csv" not in err


def test_image_files_at_the_top_of_a_class_folder_layout_are_named(tmp_path, capsys):
    _classes(tmp_path)
    write_image(tmp_path / "stray.png", _gray(99))
    load_data(str(tmp_path), 40, progress=False)
    assert "1 image file in the top folder" in capsys.readouterr().err


def test_a_folder_linked_into_a_class_folder_is_read_and_a_loop_once(tmp_path):
    """A batch of images linked into PNEUMONIA/ was skipped without a word, while a real
    sub-folder was read and a linked class folder followed."""
    root = _classes(tmp_path / "data")
    extra = tmp_path / "extra"
    for i in range(3):
        write_image(extra / f"person9{i:02d}_virus_{i}.png", _gray(500 + i))
    os.symlink(extra, root / "PNEUMONIA" / "batch3")
    os.symlink(root / "PNEUMONIA", root / "PNEUMONIA" / "loop")  # back to a parent
    names = [s.path.name for s in discover(root)["train"] if s.label == 1]
    assert len(names) == 12 + 3 and len(set(names)) == len(names)
    inputs = expand_paths([root / "PNEUMONIA"])
    assert len(inputs.files) == 15 and inputs.skipped == 0


def test_class_folder_names_with_a_stray_space_are_matched(tmp_path):
    root = _classes(tmp_path)
    (root / "PNEUMONIA").rename(root / "PNEUMONIA ")
    found = discover(root)["train"]
    assert sorted({s.label for s in found}) == [0, 1]


def test_system_files_are_neither_images_nor_warnings(tmp_path, capsys):
    root = _classes(tmp_path)
    for name in ("Thumbs.db", "desktop.ini"):
        (root / "NORMAL" / name).write_bytes(b"\x00" * 64)
    bundle = load_data(str(root), 40, progress=False)
    assert bundle.skipped == [] and "unreadable" not in capsys.readouterr().err
    assert expand_paths([root / "NORMAL"]).skipped == 0


@pytest.mark.parametrize("given, hint", [
    ("outer", "did you mean"),  # the data one level down
    ("outer/chest_xray/train/NORMAL", "is itself a class folder"),
])
def test_data_one_level_off_gets_a_hint(tmp_path, given, hint):
    _classes(tmp_path / "outer" / "chest_xray" / "train")
    (tmp_path / "outer" / "__MACOSX").mkdir()
    with pytest.raises(PneumoscanError) as e:
        discover(tmp_path / given)
    assert hint in str(e.value)
    if hint == "did you mean":
        assert str(e.value).endswith(f"did you mean {tmp_path / 'outer' / 'chest_xray'}?")


def test_a_broken_symlink_says_so(tmp_path):
    link = tmp_path / "scan.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(UnreadableImage) as e:
        read_gray(link, 40)
    assert f"broken symlink (to {tmp_path / 'gone.png'}, which does not exist)" in str(e.value)


def _pixels(split) -> set[bytes]:
    return {image.tobytes() for image in split.images}


def test_copies_under_other_names_stay_with_their_originals_in_validation(tmp_path):
    """'Copy of X.png' is no Kermany name, so it was a patient of its own: about half of a
    carved validation were copies of training images, and nothing was said."""
    root = _classes(tmp_path, n=20)
    for cls in ("NORMAL", "PNEUMONIA"):
        for path in sorted((root / cls).iterdir())[:10]:
            shutil.copy(path, path.with_name(f"Copy of {path.name}"))
    bundle = load_data(str(root), 40, progress=False)
    assert not _pixels(bundle.val) & _pixels(bundle.train)
    assert any("20 training image(s) are copies of others" in n for n in bundle.notes)


def test_a_given_val_of_training_copies_is_ignored(tmp_path):
    _classes(tmp_path / "train", n=120)
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    for path in (tmp_path / "val").rglob("*.png"):
        path.rename(path.with_name(f"Copy of {path.name}"))
    bundle = load_data(str(tmp_path), 40, progress=False)
    assert any("holds 240 image(s) that are also in train/, pixel for pixel" in n and "ignored" in n
               for n in bundle.notes), bundle.notes
    assert any("carved by patient" in n for n in bundle.notes)
    assert not _pixels(bundle.val) & _pixels(bundle.train)


def test_images_without_patient_ids_are_noted_where_validation_is_carved(tmp_path):
    bundle = load_data(str(_classes(tmp_path / "plain", named=False)), 40, progress=False)
    assert any("24 of 24 training images carry no patient id" in n for n in bundle.notes)
    named = load_data(str(_classes(tmp_path / "named")), 40, progress=False)
    assert not any("no patient id" in n for n in named.notes), named.notes


def test_a_link_up_to_the_data_is_not_read_as_a_class(tmp_path):
    """NORMAL/up -> .. read every PNEUMONIA image a second time, labelled NORMAL."""
    root = _classes(tmp_path, n=6)
    os.symlink("..", root / "NORMAL" / "up")
    labels = [s.label for s in discover(root)["train"]]
    assert labels.count(0) == 6 and labels.count(1) == 6


def test_copies_across_train_and_val_stay_together_in_folds(tmp_path):
    """cv joins train/ and val/ into one pool: a copy in val/ of a train/ image went to another
    fold than its original, and the out-of-fold figures scored images their fold trained on."""
    from pneumoscan.data.split import patient_folds

    _classes(tmp_path / "train", n=20, named=False)
    for cls in ("NORMAL", "PNEUMONIA"):
        for path in sorted((tmp_path / "train" / cls).iterdir())[:5]:
            (tmp_path / "val" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / "val" / cls / f"copy_{path.name}")
    pool = load_data(str(tmp_path), 40, progress=False, validation="pool").train
    folds = patient_folds(pool.labels, pool.patients, 5, 0)
    fold_of = np.empty(len(pool), dtype=int)
    for k, (_, held) in enumerate(folds):
        fold_of[held] = k
    by_pixels: dict[bytes, set[int]] = {}
    for image, fold in zip(pool.images, fold_of, strict=True):
        by_pixels.setdefault(image.tobytes(), set()).add(int(fold))
    assert sum(len(f) > 1 for f in by_pixels.values()) == 0
    assert len(pool) - len(by_pixels) == 10  # the copies are in the pool


def test_a_folder_that_cannot_be_looked_into_gives_no_hint_and_no_error(tmp_path, monkeypatch):
    from pneumoscan.data import discover as discover_module

    (tmp_path / "lost+found").mkdir()
    real = discover_module._children

    def locked(folder, names):
        if folder.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(folder))
        return real(folder, names)

    monkeypatch.setattr(discover_module, "_children", locked)
    with pytest.raises(PneumoscanError, match=r"expected class folders .*hold them$"):
        discover(tmp_path)
