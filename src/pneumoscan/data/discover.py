"""Find the X-rays in a folder: class folders, or train/val/test folders that hold them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pneumoscan import CLASS_NAMES
from pneumoscan.errors import PneumoscanError

SPLIT_NAMES = ("train", "val", "test")
# Kermany file names carry the patient: person1000_bacteria_2931.jpeg -> person1000,
# IM-0115-0001.jpeg -> IM-0115, NORMAL2-IM-0927-0001.jpeg -> NORMAL2-IM-0927.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)
# ... and the kind of pneumonia: person1000_bacteria_2931.jpeg, person1_virus_6.jpeg.
_KIND_PATTERN = re.compile(r"^person\d+_(bacteria|virus)_", re.IGNORECASE)
PNEUMONIA_KINDS = {"bacteria": "bacterial", "virus": "viral"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES
    patient: str


def patient_id(path: Path, root: Path) -> str:
    """The patient a Kermany file name names; otherwise the file itself is its own patient."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(path.name)
        if match:  # lower-cased, as matched: person1_... and PERSON1_... are one patient
            return match.group(1).lower()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def pneumonia_kind(path: str | Path) -> str:
    """'bacterial' or 'viral' where a Kermany file name says which, else ''."""
    match = _KIND_PATTERN.match(Path(path).name)
    return PNEUMONIA_KINDS[match.group(1).lower()] if match else ""


def discover(root: str | Path, *, need_train: bool = True) -> dict[str, list[Sample]]:
    """Samples per split. A folder of class folders alone is returned as the 'train' split.

    ``need_train``: training needs a train/ beside any val/ or test/; evaluation does not.
    """
    root = Path(root)
    if not root.is_dir():
        raise PneumoscanError(f"{root}: not a folder (expected class folders NORMAL/ PNEUMONIA/)")
    splits = _children(root, SPLIT_NAMES)
    if splits:
        found = {name: _class_samples(sub, root, empty_ok=name != "train")
                 for name, sub in splits.items()}
    elif _class_folders(root):
        found = {"train": _class_samples(root, root)}
    else:
        raise PneumoscanError(
            f"{root}: expected class folders NORMAL/ and PNEUMONIA/, or train/ (and optionally "
            "val/, test/) folders that hold them"
        )
    if need_train and "train" not in found:
        raise PneumoscanError(f"{root}: has {', '.join(found)}/ but no train/ folder")
    return {name: found[name] for name in SPLIT_NAMES if name in found}


def _children(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """The sub-folders of ``names`` by lower-cased name (any case is accepted).

    Two that differ only in case (NORMAL/ and normal/) are refused: reading one would drop the
    other's images without a word.
    """
    wanted = {name.lower() for name in names}
    out: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        key = entry.name.lower()
        if key not in wanted or not entry.is_dir():
            continue
        if key in out:
            raise PneumoscanError(
                f"{folder}: {out[key].name}/ and {entry.name}/ differ only in case; move their "
                "images into one folder")
        out[key] = Path(entry.path)
    return out


def _class_folders(folder: Path) -> dict[int, Path]:
    children = _children(folder, CLASS_NAMES)
    return {label: children[name.lower()] for label, name in enumerate(CLASS_NAMES)
            if name.lower() in children}


def split_folder(root: str | Path, name: str) -> Path:
    """The folder of split ``name`` under ``root`` as it is spelled there (Test/, test/)."""
    return _children(Path(root), SPLIT_NAMES).get(name, Path(root) / name)


def unread_folders(root: str | Path, splits: tuple[str, ...] = SPLIT_NAMES) -> list[str]:
    """Folders ``discover`` passes over, by their path under ``root``: at the top, those that are
    no split folder (when there are split folders), and in ``splits``' folders (or the top, when
    it holds class folders) those that are no class folder. Their images are not read, so a
    user should hear of them: ``PNEUMONIA_virus/`` is no ``PNEUMONIA/``."""
    root = Path(root)
    split_dirs = _children(root, SPLIT_NAMES)
    if split_dirs:
        skipped = [f"{d.name}/" for d in _subfolders(root) if d.name.lower() not in SPLIT_NAMES]
        holders = [split_dirs[name] for name in splits if name in split_dirs]
    else:
        skipped, holders = [], [root]
    classes = {name.lower() for name in CLASS_NAMES}
    for holder in holders:
        skipped += [f"{d.relative_to(root)}/" for d in _subfolders(holder)
                    if d.name.lower() not in classes]
    return skipped


def describe_unread(folders: list[str]) -> str:
    shown = ", ".join(folders[:10]) + (f" and {len(folders) - 10} more" if len(folders) > 10
                                      else "")
    return (f"not read, being neither split nor class folders: {shown} (splits are train/, "
            f"val/ and test/; classes {' and '.join(n + '/' for n in CLASS_NAMES)}, any case)")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.is_dir() and not e.name.startswith("."))


def _class_samples(folder: Path, root: Path, *, empty_ok: bool = False) -> list[Sample]:
    """The samples in ``folder``'s class folders. ``empty_ok``: a folder with no class folders
    and no files at all (a val/ or test/ made ahead of time) holds none, rather than being
    refused."""
    classes = _class_folders(folder)
    if not classes and empty_ok and not _files_under(folder):
        return []
    if not classes:
        raise PneumoscanError(
            f"{folder}: expected class folders {' and '.join(n + '/' for n in CLASS_NAMES)}"
        )
    samples = []
    for label, class_dir in classes.items():
        for path in _files_under(class_dir):
            samples.append(Sample(path, label, patient_id(path, root)))
    return samples


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted; folder symlinks are not followed (loops)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                files.append(Path(dirpath) / name)
    return files
