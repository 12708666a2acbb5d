"""Hostile input to `train`, `evaluate` and `eda`: bad files are skipped and named, bad layouts
are one line and exit 2, and nothing ever prints a traceback.

One data folder holds good synthetic images plus one file of each hostile kind; `train` runs on it
once (in-process), and each row of the table is then checked against what it printed and what it
trained on. The README's "Hostile and broken input" section is the same table in prose.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.cli import main
from pneumoscan.data.synthetic import synthetic_xray, write_synthetic_dataset

TRAIN = ["--recipe", "cpu", "--model", "seed_cnn", "--image-size", "32", "--epochs", "1",
         "--device", "cpu", "--quiet"]
VANISHING = "vanishes between discovery and decoding.png"


def xray(size: int = 48, pneumonia: bool = False) -> np.ndarray:
    return synthetic_xray(np.random.default_rng(size), size, pneumonia)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png() -> bytes:
    """A 100-byte PNG whose header claims 60000 x 60000 pixels, every checksum valid."""
    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def bad_crc_png() -> bytes:
    data = bytearray(encoded(Image.fromarray(xray()), "PNG"))
    at = data.index(b"IDAT")
    data[at + 6] ^= 0xFF  # a pixel byte changed: the chunk's CRC no longer matches
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encoded(Image.fromarray(xray(40)[:, :32]), "JPEG", exif=exif.tobytes())


def dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2") -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality = "DX"
    if pixels is not None:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def full_jpeg_cut_in_half() -> bytes:
    data = encoded(Image.fromarray(xray(96)), "JPEG", quality=95)
    return data[: len(data) // 2]


# name -> (file name, contents, the reason it is skipped for, or None: decoded and trained on)
Maker = Callable[[], bytes]
TABLE: dict[str, tuple[str, Maker, str | None]] = {
    "zero-byte": ("empty.jpeg", lambda: b"", "empty file"),
    "truncated-jpeg": ("truncated.jpeg", full_jpeg_cut_in_half, "truncated JPEG"),
    "png-bad-checksum": ("bad-crc.png", bad_crc_png, "corrupt PNG (bad checksum)"),
    "text-as-jpeg": ("notes.jpeg", lambda: b"patient notes, not an image\n" * 20,
                     "not an image (content is text/HTML)"),
    "html-as-png": ("page.png", lambda: b"<!DOCTYPE html><html><body>404</body></html>\n",
                    "not an image (content is text/HTML)"),
    "1x1-image": ("dot.png", lambda: encoded(Image.new("L", (1, 1)), "PNG"), "image too small"),
    "blank-image": ("blank.png", lambda: encoded(Image.new("L", (64, 64), 0), "PNG"),
                    "blank image (every pixel is 0)"),
    "bomb-header": ("bomb.png", bomb_png, "image too large"),
    "dicom-no-pixels": ("no-pixels.dcm", lambda: dicom(None), "DICOM has no pixel data"),
    "16-bit-png": ("sixteen.png",
                   lambda: encoded(Image.fromarray(xray().astype(np.uint16) * 257), "PNG"), None),
    "rgba-png": ("rgba.png", lambda: encoded(Image.fromarray(xray()).convert("RGBA"), "PNG"),
                 None),
    "palette-png": ("palette.png", lambda: encoded(Image.fromarray(xray()).convert("P"), "PNG"),
                    None),
    "cmyk-jpeg": ("cmyk.jpeg", lambda: encoded(Image.fromarray(xray()).convert("CMYK"), "JPEG"),
                  None),
    "exif-rotated-jpeg": ("rotated.jpeg", exif_rotated_jpeg, None),
    "monochrome1-dicom": ("mono1.dcm", lambda: dicom(xray(), "MONOCHROME1"), None),
    "spaces-non-ascii-path": ("Røntgen bild ü 1 – ß.png",
                              lambda: encoded(Image.fromarray(xray()), "PNG"), None),
    # Made as a dangling symlink and as a file deleted after discovery (see hostile_run).
    "dangling-symlink": ("gone.png", lambda: b"", "broken symlink (to "),
    "vanishes-mid-run": (VANISHING, lambda: encoded(Image.fromarray(xray()), "PNG"),
                         "file vanished or does not exist"),
}
SKIPPED = [name for name, (_, _, reason) in TABLE.items() if reason]


def build_hostile_folder(root: Path) -> dict[str, Path]:
    """Good synthetic images plus one of each TABLE entry, split over both class folders."""
    write_synthetic_dataset(root, n_train=30, n_test=8, size=32)
    paths = {}
    for i, (name, (filename, make, _)) in enumerate(TABLE.items()):
        path = root / "train" / ("NORMAL" if i % 2 else "PNEUMONIA") / filename
        if name == "dangling-symlink":
            os.symlink(root / "no such file.png", path)
        else:
            path.write_bytes(make())
        paths[name] = path
    # Symlink loops: a class folder that links to itself, and a data folder that does.
    os.symlink(root / "train" / "NORMAL", root / "train" / "NORMAL" / "loop")
    os.symlink(root, root / "loop")
    return paths


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> dict:
    """`train`, then `evaluate` and `eda`, once each on the hostile folder."""
    import pneumoscan.data.dataset as dataset
    from pneumoscan.data.dataset import load_data

    root = tmp_path_factory.mktemp("hostile") / "data with spaces, ünïcode"
    paths = build_hostile_folder(root)
    run = tmp_path_factory.mktemp("hostile-run") / "run"
    real_discover = dataset.discover

    def discover_then_delete(folder):
        found = real_discover(folder)
        paths["vanishes-mid-run"].unlink()  # gone before the decoder reaches it
        return found

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "discover", discover_then_delete)
        train = run_cli(["train", "--data", str(root), "--out", str(run), *TRAIN])
    bundle = load_data(str(root), 32, progress=False)
    # evaluate decodes only what it evaluates (a test/ split when there is one): the hostile
    # files lie in train/, so it is given that folder itself.
    evaluate = run_cli(["evaluate", str(run), "--data", str(root / "train"), "--device", "cpu",
                        "--quiet"])
    eda = run_cli(["eda", "--data", str(root), "--out", str(run / "eda"), "--image-size", "32",
                   "--quiet"])
    trained_on = set(bundle.train.paths) | set(bundle.val.paths)
    return {"root": root, "paths": paths, "run": run, "train": train, "evaluate": evaluate,
            "eda": eda, "trained_on": trained_on}


@pytest.mark.parametrize("name", list(TABLE))
def test_each_hostile_file(name, hostile_run):
    path = str(hostile_run["paths"][name])
    reason = TABLE[name][2]
    _, _, err = hostile_run["train"]
    if reason is None:
        assert path in hostile_run["trained_on"], f"{name} should decode and be trained on"
        assert path not in err
    else:
        assert any(line.startswith(f"  {path}: {reason}") for line in err.splitlines()), err
        assert path not in hostile_run["trained_on"]


@pytest.mark.parametrize("command", ["train", "evaluate", "eda"])
def test_commands_skip_name_and_count_the_bad_files(command, hostile_run):
    status, out, err = hostile_run[command]
    assert status == 0, err
    assert "Traceback" not in err + out
    # evaluate and eda run after the vanished file is gone: one fewer to name.
    expected = len(SKIPPED) - (command != "train")
    assert f"skipped {expected} unreadable file(s):" in err, err
    if command == "train":
        assert (hostile_run["run"] / "model.safetensors").exists()
        good = sum(1 for _ in (hostile_run["root"] / "train").rglob("person*.png"))
        decodable = len(TABLE) - len(SKIPPED)
        assert len(hostile_run["trained_on"]) == good + decodable  # no loop entry, no duplicate


def test_nothing_is_read_through_the_symlink_loops(hostile_run):
    assert not any("/loop/" in p for p in hostile_run["trained_on"])


LAYOUTS = {
    "empty-folder": "expected class folders NORMAL/ and PNEUMONIA/",
    "one-class-only": "only NORMAL images; training needs both classes",
    "no-class-folders": "expected class folders NORMAL/ and PNEUMONIA/",
    "empty-class-folders": "the class folders hold no files",
    "non-existent": "not a folder (expected class folders",
    "a-file-not-a-folder": "not a folder (expected class folders",
}


def make_layout(kind: str, root: Path) -> Path:
    image = encoded(Image.fromarray(xray(32)), "PNG")
    if kind == "non-existent":
        return root / "no such folder"
    root.mkdir(parents=True, exist_ok=True)
    if kind == "a-file-not-a-folder":
        (root / "x.png").write_bytes(image)
        return root / "x.png"
    if kind == "one-class-only":
        for i in range(4):
            (root / "NORMAL").mkdir(exist_ok=True)
            (root / "NORMAL" / f"{i}.png").write_bytes(image)
    elif kind == "no-class-folders":
        for i in range(4):
            (root / f"{i}.png").write_bytes(image)
        (root / "images").mkdir()
    elif kind == "empty-class-folders":
        (root / "NORMAL").mkdir()
        (root / "pneumonia").mkdir()
    return root


@pytest.mark.parametrize("command", ["train", "evaluate", "eda"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bad_layouts_are_one_line_and_exit_2(layout, command, hostile_run, tmp_path):
    data = make_layout(layout, tmp_path / "data")
    argv = {
        "train": ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN],
        "evaluate": ["evaluate", str(hostile_run["run"]), "--data", str(data), "--device", "cpu",
                     "--quiet"],
        "eda": ["eda", "--data", str(data), "--out", str(tmp_path / "eda"), "--image-size", "32",
                "--quiet"],
    }[command]
    status, out, err = run_cli(argv)
    if command in ("evaluate", "eda") and layout == "one-class-only":
        # Figures on one class are legitimate (specificity alone); they need no second class.
        # eda describes the folder, and says it cannot train a model.
        assert status == 0, err
        assert "Traceback" not in err + out
        if command == "eda":
            assert "only NORMAL images to train on; training needs both classes" in out
        return
    assert status == 2, (out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and LAYOUTS[layout] in lines[0], err
    assert not (tmp_path / "run" / "model.safetensors").exists()

