"""Find the X-rays in a folder: class folders, or train/val/test folders that hold them."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pneumoscan import CLASS_NAMES
from pneumoscan.data.decode import IMAGE_SUFFIXES
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
# Files an operating system leaves in folders of pictures: never images, never worth a warning.
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES
    patient: str


def patient_id(path: Path, root: Path) -> str:
    """The patient a Kermany file name names; otherwise the file itself is its own patient."""
    return named_patient(path.name) or (
        str(path.relative_to(root)) if path.is_relative_to(root) else str(path))


def named_patient(name: str) -> str:
    """The patient a Kermany file name names (lower-cased: person1_... and PERSON1_... are one
    patient), or "" for any other name."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).lower()
    return ""


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
            f"val/, test/) folders that hold them{_nearby_layout(root)}"
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
        key = _folder_key(entry.name)
        if key not in wanted or not entry.is_dir():
            continue
        if key in out:
            raise PneumoscanError(
                f"{folder}: {out[key].name}/ and {entry.name}/ differ only in case; move their "
                "images into one folder")
        out[key] = Path(entry.path)
    return out


def _folder_key(name: str) -> str:
    """A folder's name as split and class names are matched: any case, and a space typed at
    either end (``PNEUMONIA /``, invisible in a listing) does not count."""
    return name.strip().lower()


def _nearby_layout(folder: Path) -> str:
    """A hint for a --data one level off: the sub-folder that holds the expected layout, or
    the folder above when ``folder`` is itself a class folder."""
    if _folder_key(folder.name) in {n.lower() for n in CLASS_NAMES}:
        return f"; {folder.name}/ is itself a class folder: give the folder that holds it"
    for sub in _subfolders(folder):
        try:
            if _children(sub, SPLIT_NAMES) or _class_folders(sub):
                return f"; did you mean {sub}?"
        except OSError:  # a folder it may not look into (lost+found): no hint from there
            continue
    return ""


def _class_folders(folder: Path) -> dict[int, Path]:
    children = _children(folder, CLASS_NAMES)
    return {label: children[name.lower()] for label, name in enumerate(CLASS_NAMES)
            if name.lower() in children}


def split_folder(root: str | Path, name: str) -> Path:
    """The folder of split ``name`` under ``root`` as it is spelled there (Test/, test/)."""
    return _children(Path(root), SPLIT_NAMES).get(name, Path(root) / name)


def unread_parts(root: str | Path, splits: tuple[str, ...] = SPLIT_NAMES) -> list[str]:
    """What ``discover`` passes over, by path under ``root``: at the top, folders that are no
    split folder (when there are split folders); in ``splits``' folders (or the top, when it
    holds class folders), folders that are no class folder; and image files lying beside the
    class or split folders instead of in them. None of it is read, so a user should hear of
    it: ``PNEUMONIA_virus/`` is no ``PNEUMONIA/``."""
    root = Path(root)
    split_dirs = _children(root, SPLIT_NAMES)
    if split_dirs:
        skipped = [f"{d.name}/" for d in _subfolders(root)
                   if _folder_key(d.name) not in SPLIT_NAMES]
        holders = [root] + [split_dirs[name] for name in splits if name in split_dirs]
    else:
        skipped, holders = [], [root]
    classes = {name.lower() for name in CLASS_NAMES}
    for holder in holders:
        if holder != root or not split_dirs:
            skipped += [f"{d.relative_to(root)}/" for d in _subfolders(holder)
                        if _folder_key(d.name) not in classes]
        if loose := _loose_images(holder):
            where = f"{holder.relative_to(root)}/" if holder != root else "the top folder"
            skipped.append(f"{loose} image file{'s' if loose > 1 else ''} in {where}")
    return skipped


def describe_unread(parts: list[str]) -> str:
    shown = ", ".join(parts[:10]) + (f" and {len(parts) - 10} more" if len(parts) > 10 else "")
    return (f"not read, being outside the class folders: {shown} (images are read from class "
            f"folders {' and '.join(n + '/' for n in CLASS_NAMES)}, in split folders train/, "
            "val/, test/ or at the top; any case)")


def _loose_images(folder: Path) -> int:
    return sum(1 for e in os.scandir(folder) if not e.is_dir() and not is_system_file(e.name)
               and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)


def is_system_file(name: str) -> bool:
    """Hidden files (``.DS_Store``, macOS' ``._name`` copies) and an operating system's own."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _subfolders(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.is_dir() and not e.name.startswith("."))


def _class_samples(folder: Path, root: Path, *, empty_ok: bool = False) -> list[Sample]:
    """The samples in ``folder``'s class folders. ``empty_ok``: a folder with no class folders
    and no files at all (a val/ or test/ made ahead of time) holds none, rather than being
    refused."""
    classes = _class_folders(folder)
    if not classes and empty_ok and next(walk_files(folder), None) is None:
        return []
    if not classes:
        raise PneumoscanError(
            f"{folder}: expected class folders {' and '.join(n + '/' for n in CLASS_NAMES)}"
            f"{_nearby_layout(folder)}"
        )
    samples = []
    for label, class_dir in classes.items():
        for path in walk_files(class_dir):
            samples.append(Sample(path, label, patient_id(path, root)))
    return samples


def walk_files(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, sorted, but hidden and system files (``is_system_file``).

    Folder symlinks are followed, as torchvision's ImageFolder follows them (a batch of images
    linked into a class folder is read), each real folder once; a link to ``folder`` itself or
    to a folder above it is not (it would loop, or read the other class's images as this one's).
    """
    top = os.path.realpath(folder)
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        above = seen and Path(top).is_relative_to(os.path.realpath(dirpath))
        if (info.st_dev, info.st_ino) in seen or above:  # reached again, or upwards, by a link
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not is_system_file(name):
                yield Path(dirpath) / name
