"""One entry point from a ``--data`` value to train, validation and test arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.console import printable
from pneumoscan.data import medmnist
from pneumoscan.data.cache import Steering, decode_files, describe_errors
from pneumoscan.data.discover import (
    Sample,
    describe_unread,
    discover,
    named_patient,
    split_folder,
    unread_parts,
)
from pneumoscan.data.split import SplitError, patient_split, validation_folds
from pneumoscan.errors import PneumoscanError
from pneumoscan.seen import pixel_keys

if TYPE_CHECKING:
    from pneumoscan.config import TrainConfig

Validation = Literal["carve", "pool", "as_given"]  # load_data's three views of a data set
VALIDATION_MODES = get_args(Validation)
MIN_VAL_IMAGES = 200  # a val/ smaller than this is too noisy to select anything on


@dataclass
class Split:
    images: np.ndarray  # (N, S, S) uint8
    labels: np.ndarray  # (N,) int64, index into CLASS_NAMES
    patients: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(
            images=self.images[idx],
            labels=self.labels[idx],
            patients=[self.patients[i] for i in idx],
            paths=[self.paths[i] for i in idx],
        )

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split | None
    source: str
    notes: list[str] = field(default_factory=list)  # what was decided about the data, for the user
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""
    train_counts: np.ndarray | None = None  # per class, train before validation was carved
    test_overlap: str = ""  # the warning when test images are also training images

    def splits(self) -> dict[str, Split]:
        """The splits that hold images (cross-validation and eda may have no validation)."""
        out = {"train": self.train}
        if len(self.val):
            out["val"] = self.val
        if self.test is not None:
            out["test"] = self.test
        return out


@dataclass
class DecodedSplits:
    """The splits as read from ``--data``, before validation is carved (``arrange``)."""

    splits: dict[str, Split]
    source: str
    fingerprint: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_data(
    spec: str,
    image_size: int,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    validation: Validation = "carve",
    warn: bool = True,
) -> DataBundle:
    """Decode (or read from the cache) every split of ``spec`` at ``image_size``.

    ``validation``: "carve" (training): validation carved from train by patient, stratified,
    unless a val/ of at least MIN_VAL_IMAGES of both classes, and no patient of train/, is
    given; "pool" (cross-validation, which carves its own folds): train and any val/ as one
    pool, no validation; "as_given" (eda, which describes the data, not a training run's view
    of it): the splits as they are on disk. A val/ or test/ without one readable image is left
    out, with a note. ``warn=False`` leaves the unreadable files unsaid (listed in
    ``skipped``): torchrun's other processes decode the same files.
    """
    return arrange(read_splits(spec, image_size, progress=progress, warn=warn),
                   val_fraction=val_fraction, seed=seed, validation=validation)


def read_splits(
    spec: str, image_size: int, *, progress: bool = True, warn: bool = True,
    steering: Steering | None = None,
) -> DecodedSplits:
    """load_data's first half: every split of ``spec`` decoded (or read from the cache).

    ``steering`` lets another thread stop the decoding or learn when its workers have started
    (background.py)."""
    if is_medmnist(spec):
        splits, source, fp = _load_medmnist(spec, image_size)
        return DecodedSplits(splits, source, fp)
    splits, skipped, fp = _load_folder(Path(spec), image_size, progress, warn=warn,
                                       steering=steering)
    return DecodedSplits(splits, str(Path(spec).resolve()), fp, skipped)


def is_medmnist(spec: str) -> bool:
    """``pneumoniamnist`` or ``pneumoniamnist:SIZE``; anything else names a folder."""
    return spec.partition(":")[0].lower() == "pneumoniamnist"


def arrange(
    decoded: DecodedSplits, *, val_fraction: float = 0.1, seed: int = 0,
    validation: Validation = "carve",
) -> DataBundle:
    """load_data's second half: the checks, and validation as ``validation`` says."""
    if validation not in VALIDATION_MODES:
        raise ValueError(f"validation must be one of {VALIDATION_MODES}, got {validation!r}")
    as_given = validation == "as_given"
    splits, source, fp, skipped = (decoded.splits, decoded.source, decoded.fingerprint,
                                   decoded.skipped)
    notes: list[str] = []  # printed with the data summary, by the main process only
    for name in [n for n in splits if n != "train" and len(splits[n]) == 0]:
        notes.append(f"{name}/ has no readable images: ignored")
        del splits[name]
    _check_classes(splits["train"], f"{source} (train)", both=not as_given)
    keys = {name: pixel_keys(split.images) for name, split in splits.items()}  # once
    for name, split in splits.items():
        if contradiction := labelled_both_ways(split, keys[name]):
            notes.append(f"warning: {name}/: {contradiction}")
        splits[name], grouped = copies_as_one_patient(split, keys[name])
        if grouped and name == "train":
            notes.append(f"note: {grouped} training image(s) are copies of others (the same "
                         "pixels under another name): each goes with its original in validation"
                         " and folds")
    test_overlap = seen_in_training(splits, keys) if "test" in splits else ""
    if test_overlap:
        notes.append(f"warning: {test_overlap}")
    val = splits.get("val")
    train = splits["train"]
    train_counts = np.bincount(train.labels, minlength=len(CLASS_NAMES))
    if as_given:
        val = val if val is not None else train.subset(np.arange(0))
        if len(present := set(train.labels.tolist())) < 2:
            notes.append(f"only {CLASS_NAMES[present.pop()]} images to train on; training "
                         "needs both classes")
    elif validation == "pool":
        if val is not None:
            notes.append(f"val/ ({len(val)} images) is cross-validated with train/")
            # Copies between the two go with their originals too: one pool, one grouping.
            train = copies_as_one_patient(_concat(train, val), keys["train"] + keys["val"])[0]
        val = train.subset(np.arange(0))
        notes += _unnamed_patients(train, "folds")
    elif val is None or (unfit := why_val_unfit(val, train, keys["val"], keys["train"])):
        if val is not None:
            notes.append(f"val/ {unfit}: ignored")
        try:
            train_idx, val_idx = patient_split(train.labels, train.patients, val_fraction, seed)
        except SplitError as e:
            raise PneumoscanError(
                f"{source}: cannot carve validation from train by patient ({e}); add images, "
                "give a larger --val-fraction (up to 0.49) or a val/ folder"
            ) from None
        notes.append(describe_carved(len(val_idx), len(train), val_fraction))
        notes += _unnamed_patients(train, "validation")
        train, val = train.subset(train_idx), train.subset(val_idx)
    else:
        notes.append(f"validation: the given val/ split ({len(val)} images)")
    if len(val) and (thin := few_patients(val.labels, val.patients)):
        notes.append(f"warning: validation {thin}")
    return DataBundle(
        train=train,
        val=val,
        test=splits.get("test"),
        source=source,
        notes=notes,
        test_overlap=test_overlap,
        skipped=skipped,
        fingerprint=fp,
        train_counts=train_counts,
    )


FEW_PATIENTS = 5  # a class of validation from fewer patients than this is warned about


def few_patients(labels: np.ndarray, patients: list[str]) -> str:
    """A warning's words when a class of a validation split comes from fewer than FEW_PATIENTS
    patients, or "": its threshold, temperature and intervals rest on them (the bootstrap
    draws patients, so one patient's interval has no width, which reads as certainty)."""
    thin = []
    for c, name in enumerate(CLASS_NAMES):
        n = len({p for p, y in zip(patients, labels.tolist(), strict=True) if y == c})
        if 0 < n < FEW_PATIENTS:
            thin.append(f"{name} images of {n} patient{'s' if n > 1 else ''}")
    if not thin:
        return ""
    return (f"holds {' and '.join(thin)} only: the threshold, the temperature and the 95% "
            "intervals rest on so few (add images, or give a larger --val-fraction)")


def why_val_unfit(val: Split, train: Split, val_keys: list[bytes],
                  train_keys: list[bytes]) -> str:
    """Why a given val/ cannot be the validation split, or "" when it can. ``*_keys``: the
    splits' ``pixel_keys``."""
    if len(val) < MIN_VAL_IMAGES:
        return f"has {len(val)} images, too few to select anything on"
    if len(set(val.labels.tolist())) < 2:
        return (f"has only {CLASS_NAMES[int(val.labels[0])]} images, and validation needs both "
                "classes")
    # Patients come from Kermany-style file names; any other file is its own patient, named by
    # its path under the data folder, so it can never be in both splits.
    shared = sorted(set(val.patients) & set(train.patients))
    if shared:
        return printable(
            f"shares {len(shared)} patient{'s' if len(shared) > 1 else ''} with train/ (e.g. "
            f"{shared[0]}): it would select epochs and the threshold on patients the model "
            "trained on")
    if copies := _copies(val, val_keys, [(train, train_keys)]):
        return printable(
            f"holds {len(copies)} image(s) that are also in train/, pixel for pixel (e.g. "
            f"{copies[0][0]} = {copies[0][1]}): it would select epochs and the threshold on "
            "images the model trained on")
    return ""


def _unnamed_patients(train: Split, carved: str) -> list[str]:
    """A note when training images carry no patient id, so that ``carved`` (validation, or
    cross-validation's folds) keeps apart images rather than patients."""
    unnamed = sum(not named_patient(Path(p).name) for p in train.paths)
    if not unnamed:
        return []
    return [f"note: {unnamed} of {len(train)} training images carry no patient id (Kermany "
            "file names do: person12_bacteria_3.jpeg, IM-0001-0001.jpeg), so each is its own "
            f"patient: {carved} may hold other images of a patient that trains"]


def split_identity(split: Split) -> str:
    """Which patients a split holds, as a short digest: recorded with a run's resume state, so
    that a resume validates on the same patients (the files themselves have the fingerprint)."""
    names = "\n".join(sorted(set(split.patients)))
    return hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def training_data_options(cfg: TrainConfig, progress: bool, is_main: bool,
                          warn: bool = True) -> dict:
    """``load_data``'s options for a training run: validation carved by the run's fraction and
    seed; under torchrun only the main process shows progress and warns."""
    return {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "progress": progress and is_main,
            "warn": warn and is_main}


READ_OPTIONS = ("progress", "warn")  # load_data's options that read_splits takes; arrange the rest


def test_heading(what: str, overlap: str) -> str:
    """The line above a test split's figures: held out, or not when some of its images are
    also training images (``overlap``, the warning given with the data)."""
    if overlap:
        return (f"{what} (nothing was selected on it, but it is not held out: some of its "
                "images are training images, as warned above):")
    return f"{what} (held out; nothing was selected on it):"


def seen_in_training(splits: dict[str, Split], keys: dict[str, list[bytes]]) -> str:
    """Test images that are also training images, pixel for pixel once decoded (a file copied
    into both folders): a warning naming them, or "" when the test split is held out.
    ``keys``: each split's ``pixel_keys``."""
    test = splits["test"]
    both = _copies(test, keys["test"], [(splits[name], keys[name]) for name in ("train", "val")
                                        if name in splits])
    if not both:
        return ""
    return printable(f"{len(both)} of {len(test)} test images are also in the training data "
                     f"(e.g. {both[0][0]} = {both[0][1]}): the test figures are not held out")


def _copies(split: Split, keys: list[bytes],
            others: list[tuple[Split, list[bytes]]]) -> list[tuple[str, str]]:
    """(path, path of its copy) for each image of ``split`` that an image of ``others`` (each a
    split with its ``pixel_keys``) equals pixel for pixel."""
    index: dict[bytes, tuple[Split, int]] = {}
    for other, other_keys in others:
        for j, key in enumerate(other_keys):
            index.setdefault(key, (other, j))
    pairs = []
    for i, key in enumerate(keys):
        if key in index:
            other, j = index[key]
            if np.array_equal(split.images[i], other.images[j]):
                pairs.append((split.paths[i], other.paths[j]))
    return pairs


def copies_as_one_patient(split: Split, keys: list[bytes]) -> tuple[Split, int]:
    """``split`` with each image that copies an earlier one, pixel for pixel, given that one's
    patient, and how many were: a file saved twice under two names is otherwise two patients,
    and validation, folds and the bootstrap could put the two copies on two sides."""
    first: dict[bytes, int] = {}  # key -> row of its first image
    patients, grouped = list(split.patients), 0
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if patients[i] != patients[j] and np.array_equal(split.images[i], split.images[j]):
            patients[i] = patients[j]
            grouped += 1
    if not grouped:
        return split, 0
    return dataclasses.replace(split, patients=patients), grouped


def labelled_both_ways(split: Split, keys: list[bytes]) -> str:
    """Images of a split that are in both class folders, pixel for pixel once decoded: a
    warning naming one pair (the model is taught both answers for them), or "". ``keys``: the
    split's ``pixel_keys``."""
    first: dict[bytes, int] = {}  # key -> row of its first image
    both = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if split.labels[i] != split.labels[j] and np.array_equal(split.images[i],
                                                                 split.images[j]):
            both.append((split.paths[j], split.paths[i]))
    if not both:
        return ""
    return printable(f"{len(both)} image(s) are in both {' and '.join(CLASS_NAMES)} (e.g. "
                     f"{both[0][0]} = {both[0][1]}): their labels contradict each other")


def _check_classes(train: Split, where: str, *, both: bool) -> None:
    if len(train) == 0:
        raise PneumoscanError(f"{where}: no readable images")
    present = set(train.labels.tolist())
    if len(present) < 2 and both:
        only = CLASS_NAMES[present.pop()]
        raise PneumoscanError(f"{where}: only {only} images; training needs both classes")


def describe_carved(n_val: int, n_train: int, val_fraction: float) -> str:
    """The validation note; the share of images a whole-patient split gives can differ from
    the share asked (one of K folds, and patients bring all their images)."""
    share = n_val / n_train
    note = f"validation: {share:.0%} of train, carved by patient, stratified"
    if abs(share - val_fraction) >= 0.015:
        folds = validation_folds(val_fraction)
        why = (f"one of {folds} folds is the nearest share" if abs(1 / folds - val_fraction) >=
               0.015 else "each patient brings all of their images")
        note += f" (asked {val_fraction:.0%}: {why})"
    return note


def _concat(a: Split, b: Split) -> Split:
    return Split(
        images=np.concatenate([a.images, b.images]),
        labels=np.concatenate([a.labels, b.labels]),
        patients=a.patients + b.patients,
        paths=a.paths + b.paths,
    )


def _load_folder(
    root: Path, image_size: int, progress: bool, found: dict[str, list[Sample]] | None = None,
    *, warn: bool = True, steering: Steering | None = None,
) -> tuple[dict[str, Split], list[tuple[str, str]], str]:
    """Decode the splits ``found`` (default: every split of ``root``)."""
    found = discover(root) if found is None else found
    if warn and (unread := unread_parts(root, tuple(found))):
        print("warning: " + describe_unread(unread), file=sys.stderr)
    everything: list[Sample] = [s for samples in found.values() for s in samples]
    if not everything:
        raise PneumoscanError(f"{root}: the class folders hold no files")
    # One decode over all splits: one cache entry, and no image is decoded twice.
    decoded = decode_files([s.path for s in everything], image_size, progress=progress,
                           steering=steering)
    if decoded.errors and warn:
        print("warning: " + describe_errors(decoded.errors), file=sys.stderr)
    splits, start = {}, 0
    for name, samples in found.items():
        idx = np.arange(start, start + len(samples))
        start += len(samples)
        keep = idx[decoded.ok[idx]]
        splits[name] = Split(
            images=np.ascontiguousarray(decoded.images[keep]),
            labels=np.array([everything[i].label for i in keep], dtype=np.int64),
            patients=[everything[i].patient for i in keep],
            # Absolute: the paths are saved with the run, and read later (the report's Grad-CAM
            # gallery, predict on a run's own images) from any working directory.
            paths=[os.path.abspath(everything[i].path) for i in keep],
        )
    return splits, decoded.errors, files_fingerprint(root, everything)


FILES_FINGERPRINT = "files-1:"  # names what a fingerprint is of: runs made earlier hold others


def files_fingerprint(root: Path, samples: list[Sample]) -> str:
    """The data's identity, recorded with each run: every file's path under ``root`` and its
    size. A moved, copied or re-permissioned folder keeps it, and so does a new decoder; a file
    added, removed or resized changes it (one rewritten at its very size does not: checking
    contents would mean reading every file). The decode cache keys on far more (cache.py)."""
    h = hashlib.sha256()
    # Paths written with "/" whatever the system: a folder copied to Windows is the same data.
    relative = {s.path: os.fsencode(os.path.relpath(s.path, root).replace(os.sep, "/"))
                for s in samples}
    for sample in sorted(samples, key=lambda s: relative[s.path]):
        try:
            size = os.stat(sample.path).st_size
        except OSError:
            size = -1
        h.update(relative[sample.path] + f"\0{size}\n".encode())
    return FILES_FINGERPRINT + h.hexdigest()[:24]


def data_changed(recorded: object, current: object) -> bool:
    """Whether a run's recorded data fingerprint says its files differ from ``current``'s.
    False where the two cannot be compared: a run made before fingerprints were of files."""
    comparable = all(isinstance(x, str) and x.startswith(FILES_FINGERPRINT)
                     for x in (recorded, current))
    return comparable and recorded != current


def _load_medmnist(spec: str, image_size: int) -> tuple[dict[str, Split], str, str]:
    size = medmnist.pick_size(medmnist.parse_spec(spec), image_size)
    path = medmnist.fetch(size)
    splits = {}
    for name, (images, labels) in medmnist.load_npz(path).items():
        if images.shape[1] != image_size:
            images = _resize_all(images, image_size)
        ids = [f"{name}/{i}" for i in range(len(labels))]  # no patient ids are published
        splits[name] = Split(images=images, labels=labels, patients=ids, paths=ids)
    digest = hashlib.sha256(f"{path.name}:{image_size}".encode()).hexdigest()[:24]
    return splits, medmnist.describe(size, path), digest


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return out


@dataclass
class EvalSplit:
    split: Split
    description: str  # where the images came from, and their counts
    held_out: bool  # a test split; False when every image of the source is evaluated


def load_eval_split(spec: str, image_size: int, *, progress: bool = True,
                    warn: bool = True) -> EvalSplit:
    """The images to evaluate on: a test split if the source has one, else all of it.
    ``warn``: say which files and folders are not read (a second size of one data: not again).
    """
    if is_medmnist(spec):
        splits, source, _ = _load_medmnist(spec, image_size)
        return EvalSplit(splits["test"], f"{source}, test split", held_out=True)
    root = Path(spec)
    # A split folder of no files (a test/ made ahead of time) is left out, as training does.
    found = {name: samples for name, samples in discover(root, need_train=False).items()
             if samples}
    held_out = "test" in found
    if held_out:  # only the images evaluated are decoded
        found = {"test": found["test"]}
    splits, _, _ = _load_folder(root, image_size, progress, found, warn=warn)
    if held_out:
        split, description = splits["test"], str(split_folder(root, "test"))
    elif len(splits) == 1:
        split, description = next(iter(splits.values())), str(root)
    else:
        split = splits["train"]
        for name in ("val",):
            if name in splits:
                split = _concat(split, splits[name])
        description = f"{root} (all images: no test/ holds any)"
    if len(split) == 0:
        raise PneumoscanError(f"{description}: no readable images to evaluate")
    split = copies_as_one_patient(split, pixel_keys(split.images))[0]  # as train's test figures
    counts = ", ".join(f"{k} {v}" for k, v in split.class_counts().items())
    return EvalSplit(split, f"{description} ({len(split)} images: {counts})", held_out)
