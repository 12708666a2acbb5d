"""Discovery of folder layouts, patient ids, the patient split, the decode cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import pytest

from conftest import REAL_DATA, write_image
from pneumoscan import CLASS_NAMES
from pneumoscan.cli import main
from pneumoscan.data import cache, decode
from pneumoscan.data.cache import (
    DEFAULT_LIMIT_GB,
    cache_limit_bytes,
    decode_files,
    prune_cache,
)
from pneumoscan.data.dataset import DecodedSplits, Split, arrange, load_data
from pneumoscan.data.discover import discover, patient_id, pneumonia_kind
from pneumoscan.data.split import SplitError, patient_folds, patient_split
from pneumoscan.errors import PneumoscanError, UnreadableImage


def _gray(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        # One patient however the name is cased: PERSON1_ and person1_ were two, and could
        # land in train and validation both.
        ("PERSON1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "im-0115"),
        ("im-0115-0002.jpeg", "im-0115"),
        ("NORMAL2-IM-0927-0001.jpeg", "normal2-im-0927"),
        ("scan_42.png", "train/NORMAL/scan_42.png"),  # no id in the name: its own patient
    ],
)
def test_patient_ids_from_kermany_names(name, patient):
    root = Path("/data")
    assert patient_id(root / "train" / "NORMAL" / name, root) == patient


@pytest.mark.parametrize("folders, pair", [
    (["train/NORMAL", "Train/NORMAL", "train/PNEUMONIA"], ("Train/", "train/")),
    (["train/NORMAL", "train/normal", "train/PNEUMONIA"], ("NORMAL/", "normal/")),
])
def test_folders_that_differ_only_in_case_are_refused_not_half_read(folders, pair, tmp_path):
    """NORMAL/ and normal/ side by side: only the first was read, the other's images dropped
    without a word."""
    for i, folder in enumerate(folders):
        write_image(tmp_path / folder / f"x{i}.png", _gray(i))
    with pytest.raises(PneumoscanError) as e:
        discover(tmp_path)
    message = str(e.value)
    assert "differ only in case" in message and all(name in message for name in pair), message


def test_an_empty_val_or_test_is_left_out_with_a_note(tmp_path):
    """A val/ or test/ without one readable image stopped train and eda ("no readable images"),
    although unreadable files are otherwise skipped and the run goes on."""
    for i in range(12):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_image(tmp_path / "train" / cls / f"person{i}_x_{i}.png", _gray(i))
    (tmp_path / "val" / "NORMAL").mkdir(parents=True)
    (tmp_path / "val" / "PNEUMONIA").mkdir(parents=True)
    (tmp_path / "test" / "NORMAL").mkdir(parents=True)
    (tmp_path / "test" / "NORMAL" / "a.png").write_text("not an image")
    write_image(tmp_path / "test" / "PNEUMONIA" / "placeholder.png", _gray(0))
    (tmp_path / "test" / "PNEUMONIA" / "placeholder.png").write_bytes(b"")
    data = load_data(str(tmp_path), 32, progress=False)
    assert data.test is None and len(data.val) > 0  # validation carved instead
    assert "val/ has no readable images: ignored" in data.notes
    assert "test/ has no readable images: ignored" in data.notes
    # Bare folders made ahead of time, with no class folders in them, alike; a bare train/ not.
    shutil.rmtree(tmp_path / "val")
    shutil.rmtree(tmp_path / "test")
    (tmp_path / "val").mkdir()
    (tmp_path / "test").mkdir()
    data = load_data(str(tmp_path), 32, progress=False)
    assert data.test is None and "val/ has no readable images: ignored" in data.notes
    from pneumoscan.data.dataset import load_eval_split

    split = load_eval_split(str(tmp_path), 32, progress=False)  # every image: no test to score
    assert not split.held_out
    assert split.description == f"{tmp_path} (24 images: NORMAL 12, PNEUMONIA 12)"
    shutil.rmtree(tmp_path / "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(PneumoscanError, match="train: expected class folders"):
        discover(tmp_path)


def test_folders_that_are_not_read_are_named(tmp_path, capsys):
    """Class folders named otherwise (PNEUMONIA_virus/) and split folders named otherwise
    (testing/) were passed over without a word: an evaluation scored half the data."""
    from pneumoscan.data.dataset import load_eval_split

    for i in range(12):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_image(tmp_path / "train" / cls / f"person{i}_x_{i}.png", _gray(i))
    write_image(tmp_path / "train" / "PNEUMONIA_virus" / "v.png", _gray(1))
    write_image(tmp_path / "testing" / "NORMAL" / "t.png", _gray(2))
    (tmp_path / ".git").mkdir()  # hidden: not a data folder anyone expects read
    load_data(str(tmp_path), 32, progress=False)
    err = capsys.readouterr().err
    assert "not read, being outside the class folders: testing/, " in err
    assert f"{Path('train') / 'PNEUMONIA_virus'}/ (images are read" in err and ".git" not in err
    # Evaluation names the test folder as it is spelled on disk.
    for cls in ("NORMAL", "PNEUMONIA"):
        write_image(tmp_path / "Test" / cls / "t.png", _gray(3 if cls == "NORMAL" else 4))
    split = load_eval_split(str(tmp_path), 32, progress=False)
    assert split.description.startswith(f"{tmp_path / 'Test'} (2 images")
    assert "testing/" in capsys.readouterr().err


def test_eda_describes_the_splits_on_disk(tmp_path):
    """eda carved a validation split as train does: it refused a small set (too few patients to
    carve) and showed a 'val' that is not on disk."""
    for i in range(4):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_image(tmp_path / "train" / cls / f"person{i}_{cls}_{i}.png", _gray(i))
    data = load_data(str(tmp_path), 32, progress=False, validation="as_given")
    assert list(data.splits()) == ["train"] and len(data.train) == 8
    assert not any("validation" in note for note in data.notes)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("person1000_bacteria_2931.jpeg", "bacterial"),
        ("PERSON1_VIRUS_6.JPEG", "viral"),
        ("IM-0115-0001.jpeg", ""),
        ("scan_bacteria_1.png", ""),  # only Kermany's pattern says the kind
        ("person3_synthetic_4.png", ""),
    ],
)
def test_pneumonia_kind_from_kermany_names(name, kind):
    assert pneumonia_kind(Path("/data/train/PNEUMONIA") / name) == kind


def test_discover_class_folders_any_case_and_by_content(tmp_path):
    write_image(tmp_path / "normal" / "a.png", _gray(0))
    write_image(tmp_path / "Pneumonia" / "sub" / "b.png", _gray(1))
    # A PNG named .jpeg is still found; hidden files are not.
    (tmp_path / "Pneumonia" / "c.jpeg").write_bytes((tmp_path / "normal" / "a.png").read_bytes())
    (tmp_path / "normal" / ".DS_Store").write_bytes(b"junk")
    found = discover(tmp_path)
    assert list(found) == ["train"]
    labels = sorted((s.path.name, s.label) for s in found["train"])
    assert labels == [("a.png", 0), ("b.png", 1), ("c.jpeg", 1)]
    data = load_data(str(tmp_path), 32, progress=False, validation="pool")
    assert len(data.train) == 3 and data.train.images.dtype == np.uint8


def test_discover_split_folders(tmp_path):
    for split in ("TRAIN", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_image(tmp_path / split / cls / f"{split}_{cls}.png", _gray(hash(split) % 99))
    found = discover(tmp_path)
    assert list(found) == ["train", "val", "test"]
    assert all(len(v) == 2 for v in found.values())


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "expected class folders"),
        ({"NORMAL": 3}, "only NORMAL"),
        ({"xrays": 3}, "expected class folders"),
    ],
)
def test_bad_layouts_are_one_line_errors(tmp_path, layout, message):
    for folder, n in layout.items():
        for i in range(n):
            write_image(tmp_path / folder / f"{i}.png", _gray(i))
    with pytest.raises(PneumoscanError, match=message) as e:
        load_data(str(tmp_path), 32, progress=False)
    assert "\n" not in str(e.value)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(PneumoscanError, match="not a folder"):
        discover(tmp_path / "nope")


def test_small_val_folder_is_ignored_and_validation_carved(tmp_path):
    for i in range(40):
        cls = "PNEUMONIA" if i % 3 else "NORMAL"
        write_image(tmp_path / "train" / cls / f"person{i}_x_{i}.png", _gray(i))
    for cls in ("NORMAL", "PNEUMONIA"):
        write_image(tmp_path / "val" / cls / f"v_{cls}.png", _gray(7))
    data = load_data(str(tmp_path), 32, val_fraction=0.2, progress=False)
    assert any("too few" in note for note in data.notes)
    assert len(data.val) > 2 and len(data.train) + len(data.val) == 40
    assert data.train_counts.tolist() == [14, 26]


def _named_split(folder: str, patients: list[str], labels: list[int]) -> Split:
    paths = [f"{folder}/{CLASS_NAMES[y]}/{p}_bacteria_{i}.jpeg"
             for i, (p, y) in enumerate(zip(patients, labels, strict=True))]
    images = np.random.default_rng(len(folder)).integers(0, 256, (len(paths), 8, 8), np.uint8)
    return Split(images=images, labels=np.array(labels), patients=list(patients), paths=paths)


def _train_and_val(val_patients: list[str]) -> DecodedSplits:
    train_patients = [f"person{i}" for i in range(300)]
    train = _named_split("train", train_patients, [i % 2 for i in range(300)])
    val = _named_split("val", val_patients, [i % 2 for i in range(len(val_patients))])
    return DecodedSplits(splits={"train": train, "val": val}, source="data", fingerprint="x")


def test_a_val_folder_sharing_patients_with_train_is_ignored_and_validation_carved():
    """A given val/ was used as it was, even where its patients were also in train/: epochs,
    temperature and threshold were then chosen on patients the model had trained on."""
    val_patients = [f"person{i}" for i in range(1000, 1200)] + ["person7", "person7"]
    data = arrange(_train_and_val(val_patients), val_fraction=0.1)
    assert data.notes[0] == (
        "val/ shares 1 patient with train/ (e.g. person7): it would select epochs and the "
        "threshold on patients the model trained on: ignored")
    assert "person1000" not in data.val.patients + data.train.patients  # carved from train/
    assert len(data.train) + len(data.val) == 300
    assert not set(data.train.patients) & set(data.val.patients)


def test_a_val_folder_of_other_patients_is_the_validation_split():
    val_patients = [f"person{i}" for i in range(1000, 1202)]
    data = arrange(_train_and_val(val_patients), val_fraction=0.1)
    assert data.notes == ["validation: the given val/ split (202 images)"]
    assert data.val.patients == val_patients and len(data.train) == 300


def test_files_without_patient_ids_are_not_shared_between_folders():
    root = Path("/data")
    assert (patient_id(root / "train" / "NORMAL" / "scan_1.png", root)
            != patient_id(root / "val" / "NORMAL" / "scan_1.png", root))


def test_patient_split_keeps_patients_together_and_stratifies():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in rng.integers(0, 400, 1200)]
    pneumonia_patients = {p for p in set(patients) if hash(p) % 4}
    labels = np.array([int(p in pneumonia_patients) for p in patients])
    train_idx, val_idx = patient_split(labels, patients, 0.1, seed=0)
    assert not {patients[i] for i in train_idx} & {patients[i] for i in val_idx}
    assert len(train_idx) + len(val_idx) == len(labels)
    assert abs(len(val_idx) / len(labels) - 0.1) < 0.03
    assert abs(labels[val_idx].mean() - labels.mean()) < 0.02


def test_patient_folds_cover_every_image_once():
    labels = np.array([0, 1] * 50)
    patients = [f"p{i // 2}" for i in range(100)]
    folds = patient_folds(labels, patients, 5, seed=1)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(100))


def test_folds_a_class_cannot_fill_are_refused_in_words():
    # 6 PNEUMONIA patients cannot be spread over 7 stratified folds (scikit-learn would raise its
    # own error, or only warn and make folds without them).
    labels = np.array([0] * 8 + [1] * 6)
    patients = [f"p{i}" for i in range(14)]
    with pytest.raises(SplitError, match="at least 7 patients of each class; PNEUMONIA images "
                                         "come from 6"):
        patient_folds(labels, patients, 7, seed=0)
    assert len(patient_folds(labels, patients, 6, seed=0)) == 6
    # Patients, not images, count: 6 PNEUMONIA images of 2 patients fill only 2 folds.
    grouped = [f"p{i}" for i in range(8)] + ["q0"] * 3 + ["q1"] * 3
    with pytest.raises(SplitError, match="PNEUMONIA images come from 2"):
        patient_folds(labels, grouped, 3, seed=0)
    folds = patient_folds(labels, grouped, 2, seed=0)
    assert all(set(labels[held].tolist()) == {0, 1} for _, held in folds)
    with pytest.raises(SplitError, match="10% validation split is one of 10 such folds"):
        patient_split(labels, patients, 0.1, seed=0)


def test_too_small_a_class_to_carve_validation_is_one_line(tmp_path):
    for i in range(8):
        write_image(tmp_path / "NORMAL" / f"IM-{i:04d}-0001.png", _gray(10 * i))
    for i in range(6):
        write_image(tmp_path / "PNEUMONIA" / f"person{i}_bacteria_{i}.png", _gray(5 * i + 3))
    with pytest.raises(PneumoscanError, match="cannot carve validation from train by patient") as e:
        load_data(str(tmp_path), 16, progress=False)
    assert "PNEUMONIA images come from 6" in str(e.value) and "--val-fraction" in str(e.value)
    # A larger share of validation needs fewer patients of each class: this one works.
    data = load_data(str(tmp_path), 16, val_fraction=0.25, progress=False)
    assert len(data.train) + len(data.val) == 14


def test_decode_cache_is_reused_and_rebuilt_when_files_change(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(3)]
    cache = tmp_path / "cache"
    first = decode_files(paths, 16, cache_dir=cache, progress=False)
    assert isinstance(first.images, np.memmap)  # read back memory-mapped
    again = decode_files(paths, 16, cache_dir=cache, progress=False)
    assert again.fingerprint == first.fingerprint
    write_image(paths[0], _gray(99))
    os.utime(paths[0], ns=(1, 1))
    changed = decode_files(paths, 16, cache_dir=cache, progress=False)
    assert changed.fingerprint != first.fingerprint
    assert not np.array_equal(changed.images[0], first.images[0])


def test_the_decode_cache_keeps_the_recently_used_arrays_within_its_limit(tmp_path,
                                                                         monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    # Four arrays of 1,000 bytes each, used one after another (mtimes 1..4), and a file of
    # someone else's that pruning must never touch.
    for i, fp in enumerate(["a" * 24, "b" * 24, "c" * 24, "d" * 24], start=1):
        for suffix, size in ((".npy", 900), (".json", 100)):
            path = cache / f"{fp}{suffix}"
            path.write_bytes(b"x" * size)
            os.utime(path, (i, i))
    (cache / "notes.txt").write_bytes(b"x" * 5000)
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(3)]
    monkeypatch.setenv("PNEUMOSCAN_CACHE_GB", str(2_500 / 1e9))  # room for two arrays
    new = decode_files(paths, 16, cache_dir=cache, progress=False)  # 3 x 16 x 16 + header
    left = {p.stem for p in cache.iterdir() if p.suffix in (".npy", ".json")}
    assert left == {new.fingerprint, "d" * 24}  # the newest, then the most recently used
    assert (cache / "notes.txt").exists()
    # A cache hit counts as a use: a reused old array outlives a newer unused one.
    os.utime(cache / f"{new.fingerprint}.json", (0, 0))
    os.utime(cache / f"{new.fingerprint}.npy", (0, 0))
    again = decode_files(paths, 16, cache_dir=cache, progress=False)
    assert again.fingerprint == new.fingerprint
    assert prune_cache(cache, limit=1_500) == ["d" * 24]
    assert (cache / f"{new.fingerprint}.npy").exists()
    # A hit prunes too: a cache over its limit (left by an older version) is brought within it.
    _fake_entry(cache, "e" * 24, used=5)
    monkeypatch.setenv("PNEUMOSCAN_CACHE_GB", str(1_500 / 1e9))
    decode_files(paths, 16, cache_dir=cache, progress=False)
    assert not (cache / f"{'e' * 24}.npy").exists()


@pytest.mark.parametrize("text", ["lots", "nan", "-1", "inf", ""])
def test_a_bad_cache_limit_falls_back_to_the_default(monkeypatch, text):
    # nan or a negative limit would otherwise empty the whole cache on the next store.
    monkeypatch.setenv("PNEUMOSCAN_CACHE_GB", text)
    assert cache_limit_bytes() == DEFAULT_LIMIT_GB * 1e9
    monkeypatch.setenv("PNEUMOSCAN_CACHE_GB", "0.5")
    assert cache_limit_bytes() == 0.5e9


def _fake_entry(cache: Path, fp: str, used: float, size: int = 1000) -> None:
    for suffix, n in ((".npy", size - 100), (".json", 100)):
        path = cache / f"{fp}{suffix}"
        path.write_bytes(b"x" * n)
        os.utime(path, (used, used))


def test_the_cache_makes_room_before_it_writes(tmp_path, monkeypatch):
    # A disk the cache has filled: the new array cannot be written, but the old ones still go.
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_entry(cache, "a" * 24, used=1, size=5000)
    monkeypatch.setenv("PNEUMOSCAN_CACHE_GB", str(1_000 / 1e9))

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pneumoscan.data.cache._write_cache", disk_full)
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(2)]
    decoded = decode_files(paths, 16, cache_dir=cache, progress=False)
    assert decoded.ok.all()  # decoded all the same, just not cached
    assert not list(cache.glob("a*"))


def test_pruning_counts_only_what_it_removed_and_clears_stale_temp_files(tmp_path,
                                                                         monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    for i, fp in enumerate(["a" * 24, "b" * 24, "c" * 24], start=1):
        _fake_entry(cache, fp, used=i)
    stale, fresh = cache / f".{'d' * 24}.npy.x1.tmp", cache / f".{'e' * 24}.npy.x2.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))  # left by a writer killed long ago
    fresh.write_bytes(b"x")  # a write in progress
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.startswith("a"):  # as on a system that will not delete a mapped file
            raise PermissionError(13, "in use", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert prune_cache(cache, limit=1_500) == ["b" * 24, "c" * 24]
    assert (cache / f"{'a' * 24}.npy").exists() and not stale.exists() and fresh.exists()


_FINGERPRINT = """
import sys
from pneumoscan.data import cache, decode
print(cache.fingerprint([sys.argv[1]], 16))
assert decode.decoder_signature.cache_info().misses == 1  # once a process
assert "pydicom" not in sys.modules, "pydicom imported for its version"
"""


def test_an_edited_decoder_does_not_reuse_the_cache(tmp_path):
    # A hand-bumped version once went unbumped and old pixels were served: the key follows
    # decode.py's own text, whatever the edit.
    shutil.copytree(Path(cache.__file__).parents[1], tmp_path / "src" / "pneumoscan")
    image = write_image(tmp_path / "a.png", _gray(0))

    def fingerprint() -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
        run = [sys.executable, "-c", _FINGERPRINT, str(image)]
        return subprocess.run(run, env=env, capture_output=True, text=True)

    before = fingerprint()
    with open(tmp_path / "src" / "pneumoscan" / "data" / "decode.py", "a") as f:
        f.write("\nDETECTOR_DEPTHS = (8, 12, 16)\n")
    after = fingerprint()
    assert after.stdout.split()[:1] != before.stdout.split()[:1]
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr


def test_another_pillow_does_not_reuse_the_cache(tmp_path, monkeypatch):
    paths = [write_image(tmp_path / "a.png", _gray(0))]
    first = decode_files(paths, 16, cache_dir=tmp_path / "cache", progress=False)
    with monkeypatch.context() as m:
        m.setattr(PIL, "__version__", "0.0")
        decode.decoder_signature.cache_clear()
        try:
            changed = decode_files(paths, 16, cache_dir=tmp_path / "cache", progress=False)
        finally:
            decode.decoder_signature.cache_clear()  # the real Pillow's, for the tests after
    assert changed.fingerprint != first.fingerprint


def test_decode_failures_are_not_cached(tmp_path, monkeypatch):
    # Most failures are fixed outside the file (pydicom installed, a codec, a permission): the
    # next load must see the fix although no file changed.
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(3)]
    (tmp_path / "empty.png").write_bytes(b"")
    paths.append(tmp_path / "empty.png")
    real_read_gray = cache.read_gray

    def no_pydicom(path, size):
        if path == paths[1]:
            raise UnreadableImage(path, "pydicom is not installed: pip install pydicom")
        return real_read_gray(path, size)

    monkeypatch.setattr(cache, "read_gray", no_pydicom)
    first = decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert first.ok.tolist() == [True, False, True, False]
    assert [reason for _, reason in first.errors] == [
        "pydicom is not installed: pip install pydicom", "empty file"]
    monkeypatch.setattr(cache, "read_gray", real_read_gray)  # pydicom installed
    fixed = decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert fixed.fingerprint == first.fingerprint and isinstance(fixed.images, np.memmap)
    assert fixed.ok.tolist() == [True, True, True, False]
    assert fixed.errors == [(str(paths[3]), "empty file")]  # still unreadable, still named
    np.testing.assert_array_equal(fixed.images[1], decode.read_gray(paths[1], 16))
    np.testing.assert_array_equal(fixed.images[0], first.images[0])
    # The newly readable file went into the cache: it is not decoded again.
    monkeypatch.setattr(cache, "read_gray", no_pydicom)
    again = decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert again.ok.tolist() == [True, True, True, False]


def test_a_file_name_that_is_not_utf8_is_decoded(tmp_path):
    name = os.fsdecode(b"R\xf6ntgen.png")  # Latin-1, surrogate-escaped by Python
    try:
        path = write_image(tmp_path / name, _gray(3))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    decoded = decode_files([path], 16, cache_dir=tmp_path / "cache", progress=False)
    assert decoded.ok.tolist() == [True]


@pytest.mark.parametrize("how", ["rsync -a", "cp -p"])
def test_a_replaced_file_with_its_mtime_kept_is_decoded_again(tmp_path, how):
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(2)]
    first = decode_files(paths, 16, cache_dir=tmp_path / "cache", progress=False)
    kept = os.stat(paths[0])
    other = write_image(tmp_path / "new" / "0.png", _gray(1))  # the same size: the same shape
    assert other.stat().st_size == kept.st_size
    if how == "rsync -a":  # a new file renamed over the old one
        os.replace(other, paths[0])
    else:  # the old file overwritten in place; the ctime moves on by a clock tick at least
        time.sleep(0.05)
        shutil.copyfile(other, paths[0])
    os.utime(paths[0], ns=(kept.st_atime_ns, kept.st_mtime_ns))
    changed = decode_files(paths, 16, cache_dir=tmp_path / "cache", progress=False)
    assert changed.fingerprint != first.fingerprint
    np.testing.assert_array_equal(changed.images[0], changed.images[1])


def test_unreadable_files_are_skipped_and_named(tmp_path, capsys):
    for i in range(6):
        write_image(tmp_path / ("PNEUMONIA" if i % 2 else "NORMAL") / f"{i}.png", _gray(i))
    (tmp_path / "NORMAL" / "empty.png").write_bytes(b"")
    (tmp_path / "PNEUMONIA" / "notes.jpeg").write_text("<html>not an x-ray</html>")
    data = load_data(str(tmp_path), 32, progress=False, validation="pool")
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s)" in err
    assert "empty.png" in err and "notes.jpeg" in err
    assert len(data.train) == 6


@pytest.mark.skipif(not REAL_DATA.exists(), reason="real data not beside the project")
def test_real_kermany_layout_and_patients():
    found = discover(REAL_DATA)
    samples = found["train"]
    assert len(samples) == 5216
    assert sum(s.label for s in samples) == 3875
    assert len({s.patient for s in samples}) < len(samples)  # several images share a patient
    kinds = [pneumonia_kind(s.path) for s in samples if s.label == 1]
    assert kinds.count("bacterial") == 2530 and kinds.count("viral") == 1345  # every one named


@pytest.mark.parametrize("fraction, folds", [(0.1, 10), (0.2, 5), (0.4, 3), (0.45, 2)])
def test_the_validation_split_is_the_fold_nearest_the_share_asked(fraction, folds):
    from pneumoscan.data.split import validation_folds

    assert validation_folds(fraction) == folds  # 0.4: a third is nearer than a half


def test_the_validation_note_gives_the_share_carved_and_why_it_differs():
    from pneumoscan.data.dataset import describe_carved

    expected = "validation: 10% of train, carved by patient, stratified"
    assert describe_carved(45, 450, 0.1) == expected
    note = describe_carved(30, 89, 0.4)
    assert note.startswith("validation: 34% of train") and "asked 40%: one of 3 folds" in note
    note = describe_carved(60, 450, 0.1)
    assert note.endswith("(asked 10%: each patient brings all of their images)")


def test_test_images_that_are_also_training_images_are_named(synthetic_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    assert not any("training data" in note for note in load_data(str(data), 32).notes)
    source = sorted((data / "train" / "NORMAL").iterdir())[0]
    shutil.copy(source, data / "test" / "NORMAL" / "copied.png")
    (warning,) = [n for n in load_data(str(data), 32, progress=False).notes if "training" in n]
    assert warning.startswith("warning: 1 of 31 test images are also in the training data")
    assert f"copied.png = {source}" in warning and "not held out" in warning
    # The figures' heading says so too, rather than "held out".
    from pneumoscan.data.dataset import test_heading

    assert test_heading("test", "") == "test (held out; nothing was selected on it):"
    assert "not held out" in test_heading("test", warning)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", "cpu",
                 "--model", "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test (nothing was selected on it, but it is not held out" in out
    assert "held out; nothing" not in out


def test_an_image_in_both_class_folders_is_named(synthetic_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    assert not any("both" in note for note in load_data(str(data), 32, progress=False).notes)
    source = sorted((data / "train" / "NORMAL").iterdir())[0]
    shutil.copy(source, data / "train" / "PNEUMONIA" / "copied.png")
    notes = load_data(str(data), 32, progress=False).notes
    (warning,) = [n for n in notes if "both" in n]
    assert warning.startswith("warning: train/: 1 image(s) are in both NORMAL and PNEUMONIA")
    assert f"{source} = " in warning and "copied.png" in warning


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_medmnist_file_is_one_line(tmp_path, damage):
    from pneumoscan.data.medmnist import load_npz

    path = tmp_path / "pneumoniamnist.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(path, **{
        f"{split}_{what}": rng.integers(0, 2, (8, 28, 28) if what == "images" else (8, 1))
        for split in ("train", "val", "test") for what in ("images", "labels")
    })
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(PneumoscanError, match="not a readable MedMNIST file") as e:
        load_npz(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_the_datas_fingerprint_follows_its_files_not_where_they_lie(tmp_path):
    """Recorded with each run (resume, the report): a copied or moved folder is the same data;
    a rewritten file is not."""
    from pneumoscan.data.dataset import load_data
    from pneumoscan.data.synthetic import write_synthetic_dataset

    first = write_synthetic_dataset(tmp_path / "a", n_train=60, n_test=4, size=32)
    copy = shutil.copytree(first, tmp_path / "elsewhere" / "b")
    fingerprint = load_data(str(first), 32, progress=False).fingerprint
    assert load_data(str(copy), 32, progress=False).fingerprint == fingerprint
    png = sorted((copy / "train").rglob("*.png"))[0]
    png.write_bytes(png.read_bytes() + b"\0")  # the same pixels, another file
    assert load_data(str(copy), 32, progress=False).fingerprint != fingerprint


def test_eda_intensity_statistics_by_chunks_equal_the_whole():
    """eda's statistics a chunk at a time (a float64 copy of a class at 224 px is 1.5 GB)."""
    from pneumoscan.eda import _intensity

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 40, 40), dtype=np.uint8)
    idx = np.arange(0, 300, 2)
    mean, std = _intensity(images, idx, chunk=7)
    assert mean == pytest.approx(images[idx].reshape(len(idx), -1).mean(axis=1).mean())
    assert std == pytest.approx(images[idx].std(dtype=np.float64))


def test_decode_workers_start_with_ctrl_c_ignored(tmp_path, monkeypatch):
    # A worker started afresh (macOS, Windows) imports numpy and Pillow before its initializer
    # ignores Ctrl-C: it inherits the ignoring from the process that starts it instead.
    import signal

    import pneumoscan.data.cache as cache

    seen = []

    class RecordingPool:
        def __init__(self, max_workers, initializer):
            pass

        def map(self, fn, *iterables):
            seen.append(signal.getsignal(signal.SIGINT))
            return map(fn, *iterables)

        def shutdown(self, **_):
            pass

    monkeypatch.setattr(cache, "ProcessPoolExecutor", RecordingPool)
    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(cache._CHUNK + 1)]
    before = signal.getsignal(signal.SIGINT)
    assert decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=2, progress=False).ok.all()
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is before  # and Ctrl-C works again in the main process


def test_windows_gets_at_most_61_decode_workers(monkeypatch):
    import pneumoscan.data.cache as cache

    monkeypatch.setattr(cache.os, "cpu_count", lambda: 128)
    assert cache.decode_workers(None) == 128
    monkeypatch.setattr(cache.os, "name", "nt")  # ProcessPoolExecutor's limit there
    assert cache.decode_workers(None) == 61 and cache.decode_workers(4) == 4


def test_the_datas_fingerprint_is_the_same_on_windows(tmp_path, monkeypatch):
    # Relative paths are hashed with "/": a folder copied between systems is the same data
    # (resume accepts it, report does not call it other images).
    import ntpath

    from pneumoscan.data import dataset
    from pneumoscan.data.discover import discover
    from pneumoscan.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "a", n_train=20, n_test=4, size=32)
    samples = [s for found in discover(root).values() for s in found]
    here = dataset.files_fingerprint(root, samples)
    monkeypatch.setattr(dataset.os.path, "relpath", ntpath.relpath)  # as Windows writes them
    monkeypatch.setattr(dataset.os, "sep", "\\")
    assert dataset.files_fingerprint(root, samples) == here


def test_decoding_stops_when_asked_and_stores_nothing(tmp_path):
    from pneumoscan.data.cache import DecodingStopped, Steering

    paths = [write_image(tmp_path / f"{i}.png", _gray(i)) for i in range(cache._CHUNK + 1)]
    steering = Steering()
    steering.stop.set()
    with pytest.raises(DecodingStopped):
        decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=2, progress=False,
                     steering=steering)
    assert not steering.started.is_set()  # stopped before any worker was started
    assert not list((tmp_path / "cache").glob("*.npy"))
    # Not stopped, the same call decodes and stores as ever, and says its workers started.
    steering = Steering()
    assert decode_files(paths, 16, cache_dir=tmp_path / "cache", workers=2, progress=False,
                        steering=steering).ok.all()
    assert steering.started.is_set()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def _forked(monkeypatch):
    """Load in the background as Linux does, on any system."""
    import pneumoscan.data.background as background

    monkeypatch.setattr(background, "workers_are_forked", lambda: True)
    return background


_DECODE_CHUNK = cache._decode_chunk


def _slow_decode_chunk(paths, size):  # at module level: the pool sends it by name
    time.sleep(0.3)
    return _DECODE_CHUNK(paths, size)


def test_data_loaded_in_the_background_equals_data_loaded_at_once(synthetic_data, tmp_path,
                                                                  monkeypatch):
    background = _forked(monkeypatch)
    options = {"progress": False, "val_fraction": 0.2, "seed": 3}
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "direct"))
    direct = load_data(str(synthetic_data), 32, **options)
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "background"))  # decoded afresh
    with background.loading_in_background(str(synthetic_data), 32, **options) as pending:
        pending.imports_done()
        data = pending.result()
    assert list((tmp_path / "background").rglob("*.npy"))
    assert data.fingerprint == direct.fingerprint and data.notes == direct.notes
    assert data.splits().keys() == direct.splits().keys()
    for name, split in direct.splits().items():
        assert np.array_equal(data.splits()[name].images, split.images)
        assert data.splits()[name].paths == split.paths


def test_the_workers_exist_before_the_block_goes_on(synthetic_data, tmp_path, monkeypatch):
    # Forked while the main thread waits, not while it imports (a module half imported at the
    # fork stays locked in the worker's copy of the process).
    import multiprocessing

    background = _forked(monkeypatch)
    monkeypatch.setattr(cache, "_decode_chunk", _slow_decode_chunk)
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    with background.loading_in_background(str(synthetic_data), 32, progress=False) as pending:
        assert multiprocessing.active_children()
        pending.result()


def test_an_error_found_before_decoding_is_raised_at_once(tmp_path, monkeypatch):
    # A folder without images is said before the command goes on to import and warm up.
    background = _forked(monkeypatch)
    (tmp_path / "NORMAL").mkdir()
    entered = False
    with pytest.raises(PneumoscanError, match="no"):
        with background.loading_in_background(str(tmp_path), 32, progress=False):
            entered = True
    assert not entered


def test_the_thread_blocks_ctrl_c_and_carves_only_after_the_main_threads_imports(
        synthetic_data, monkeypatch):
    # Ctrl-C is the main thread's (the workers forked from the thread start with it blocked);
    # validation, which imports scikit-learn, waits until the main thread has imported its own.
    import signal
    import threading

    background = _forked(monkeypatch)
    seen = {}
    read, arrange = background.read_splits, background.arrange

    def recording_read(*args, **kwargs):
        seen["blocked"] = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return read(*args, **kwargs)

    def recording_arrange(*args, **kwargs):
        seen["arranged in"] = threading.current_thread()
        return arrange(*args, **kwargs)

    monkeypatch.setattr(background, "read_splits", recording_read)
    monkeypatch.setattr(background, "arrange", recording_arrange)
    with background.loading_in_background(str(synthetic_data), 32, progress=False) as pending:
        time.sleep(0.3)  # long enough to decode these images and carve, were it allowed
        assert "arranged in" not in seen
        pending.imports_done()
        assert len(pending.result().val) > 0
    assert seen["blocked"] and seen["arranged in"] is not threading.main_thread()
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # main's untouched


def test_a_decode_worker_forked_with_ctrl_c_blocked_ignores_it_and_unblocks_it():
    import signal

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old_handler = signal.getsignal(signal.SIGINT)
    try:
        cache._ignore_sigint()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGINT, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def test_leaving_the_block_early_stops_the_decoding_and_waits_for_it(monkeypatch):
    import threading

    background = _forked(monkeypatch)
    asked_to_stop, ended = threading.Event(), threading.Event()

    def slow_read(spec, image_size, *, steering, **options):
        steering.started.set()  # the workers are running
        assert steering.stop.wait(timeout=30)  # decoding, until told to stop
        asked_to_stop.set()
        time.sleep(0.2)  # the chunks in progress end
        ended.set()
        raise cache.DecodingStopped

    monkeypatch.setattr(background, "read_splits", slow_read)
    with pytest.raises(KeyboardInterrupt):
        with background.loading_in_background("folder", 32):
            raise KeyboardInterrupt  # e.g. Ctrl-C while torch imports
    assert asked_to_stop.is_set() and ended.is_set()  # the thread ended before the block's exit


CTRL_C_WHILE_WAITING = """
import os, signal, sys, threading, time
import pneumoscan.data.cache as cache
from pneumoscan.data import background
decode, chunks = cache._decode_chunk, []
def slow(paths, size):
    time.sleep(0.4)
    return decode(paths, size)
cache._decode_chunk = slow
class Bar:
    def update(self, n):
        chunks.append(n)
    def close(self):
        pass
cache._progress_bar = lambda total, enabled: Bar()
try:
    with background.loading_in_background(sys.argv[1], 16, progress=False) as data:
        data.imports_done()
        threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT)).start()
        data.result()
except KeyboardInterrupt:
    import multiprocessing
    workers = len(multiprocessing.active_children())  # the decoding had ended: none left
    seen = len(chunks)
    time.sleep(1.0)
    print(workers, seen, len(chunks))
"""


def test_ctrl_c_while_waiting_for_the_data_waits_for_the_thread_to_stop(tmp_path):
    # On Python 3.11 a Ctrl-C in Thread.join() marks the thread finished while it still runs:
    # the command would end and leave it decoding and writing the cache.
    for i in range(6 * cache._CHUNK):  # 12 chunks of 0.4 s on 2 workers: 2.4 s of decoding
        write_image(tmp_path / "data" / ("NORMAL" if i % 2 else "PNEUMONIA") / f"p{i}.png",
                    _gray(i, 20))
    env = {**os.environ, "PNEUMOSCAN_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_WAITING, str(tmp_path / "data")],
                         capture_output=True, text=True, env=env, timeout=120)
    workers, seen, later = out.stdout.split()
    assert workers == "0" and seen == later, out.stdout + out.stderr
    assert int(seen) < 6 * cache._CHUNK  # interrupted half way
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not list(
        (tmp_path / "cache").rglob("*.npy"))


@pytest.mark.parametrize("spec, forked", [("SYNTHETIC", False), ("pneumoniamnist:28", True)])
def test_some_data_loads_in_the_main_thread_when_asked(spec, forked, synthetic_data,
                                                        monkeypatch):
    # Where workers start afresh (macOS, Windows) only the main thread can have them start with
    # Ctrl-C ignored; and PneumoniaMNIST's download could not be stopped half way by Ctrl-C.
    import threading

    import pneumoscan.data.background as background

    read_in = []
    real_read = background.read_splits

    def fake_read(spec, image_size, **kwargs):  # PneumoniaMNIST's files are not fetched here
        read_in.append(threading.current_thread())
        return real_read(str(synthetic_data), image_size, **kwargs)

    monkeypatch.setattr(background, "read_splits", fake_read)
    monkeypatch.setattr(background, "workers_are_forked", lambda: forked)
    spec = str(synthetic_data) if spec == "SYNTHETIC" else spec
    with background.loading_in_background(spec, 32, progress=False) as pending:
        assert read_in == []
        assert len(pending.result().train) > 0
    assert read_in == [threading.main_thread()]


def test_a_pneumoniamnist_size_it_does_not_come_in_is_said_at_once(monkeypatch):
    background = _forked(monkeypatch)
    with pytest.raises(PneumoscanError, match="comes in sizes"):
        with background.loading_in_background("pneumoniamnist:999", 32):
            pass
    assert not background.is_medmnist("pneumoniamnist_scans")  # a folder of that name


def test_validation_from_few_patients_is_warned_about(tmp_path):
    """All 30 PNEUMONIA images of a carved validation came from one patient: its sensitivity's
    interval was [0.967, 0.967], which reads as certainty, and nothing said why."""
    from pneumoscan.data.dataset import few_patients

    for i in range(40):
        write_image(tmp_path / "NORMAL" / f"IM-{i:04d}-0001.png", _gray(i))
    for i in range(10):
        for j in range(4):
            write_image(tmp_path / "PNEUMONIA" / f"person{i}_virus_{j}.png", _gray(100 + 4 * i + j))
    bundle = load_data(str(tmp_path), 40, progress=False)
    warned = [n for n in bundle.notes if n.startswith("warning: validation holds")]
    assert len(warned) == 1 and "PNEUMONIA images of 1 patient " in warned[0], bundle.notes
    labels = np.array([0] * 5 + [1] * 3)
    assert few_patients(labels, [f"n{i}" for i in range(5)] + ["p1", "p2", "p2"]) == (
        "holds PNEUMONIA images of 2 patients only: the threshold, the temperature and the 95% "
        "intervals rest on so few (add images, or give a larger --val-fraction)")
    assert few_patients(labels, [f"n{i}" for i in range(5)] + ["p1", "p2", "p3"]) == (
        "holds PNEUMONIA images of 3 patients only: the threshold, the temperature and the 95% "
        "intervals rest on so few (add images, or give a larger --val-fraction)")
