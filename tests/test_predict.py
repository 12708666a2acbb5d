"""pneumoscan predict: rows, formats, folders, globs, bad files among good ones, DICOM, ensembles.

The trained run is conftest's session fixture ``trained_run`` (seed_cnn, 32 px, synthetic data),
trained once per test session.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.data.decode import read_gray
from pneumoscan.model_io import load_predictor, read_meta, save_meta
from pneumoscan.predict import FIELDS, expand_paths, predict_files

REAL_JPEG = (
    Path(__file__).resolve().parents[2]
    / "shared/data/chest_xray_224/train/NORMAL/IM-0115-0001.jpeg"
)


def _some_images(synthetic_data: Path, n: int) -> list[Path]:
    files = sorted((synthetic_data / "test").rglob("*.png"))
    assert len(files) >= n
    return files[:n]


@pytest.fixture
def mixed_folder(tmp_path, synthetic_data) -> tuple[Path, list[Path], list[Path]]:
    """Three good PNGs, a text file named .png, and a truncated PNG, in one folder."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = []
    for i, src in enumerate(_some_images(synthetic_data, 3)):
        good.append(Path(shutil.copy(src, folder / f"good{i}.png")))
    bad_text = folder / "notes.png"
    bad_text.write_text("this is not an image\n")
    truncated = folder / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:200])
    return folder, good, [bad_text, truncated]


def _expected(run: Path, paths: list[Path]) -> dict[str, float]:
    predictor = load_predictor(run)
    images = np.stack([read_gray(p, predictor.image_size) for p in paths])
    return {str(p): float(v) for p, v in zip(paths, predictor.predict_proba(images), strict=True)}


def test_csv_rows_and_exit_2_with_bad_files(trained_run, mixed_folder, tmp_path, capsys):
    folder, good, bad = mixed_folder
    out = tmp_path / "pred.csv"
    status = main(["predict", str(trained_run), str(folder), "--output", str(out), "--quiet",
                   "--batch-size", "2"])
    assert status == 2
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = {row["path"]: row for row in reader}
    assert set(rows) == {str(p) for p in good + bad}
    threshold = read_meta(trained_run)["threshold"]
    expected = _expected(trained_run, good)
    for path in good:
        row = rows[str(path)]
        assert row["error"] == ""
        p = float(row["probability"])
        assert p == pytest.approx(expected[str(path)], abs=1e-5)
        assert row["label"] == ("PNEUMONIA" if p >= threshold else "NORMAL")
        assert float(row["threshold"]) == pytest.approx(threshold)
    for path in bad:
        assert rows[str(path)]["probability"] == ""
        assert rows[str(path)]["label"] == ""
        assert rows[str(path)]["error"]
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "predict:" in line]
    failed = [line for line in err_lines if any(str(p) in line for p in bad)]
    assert len(failed) == 2, err_lines
    assert any("not an image" in line for line in failed)
    assert any("truncated" in line for line in failed)
    assert "Traceback" not in capsys.readouterr().err


def test_json_output_matches_the_predictor(trained_run, synthetic_data, tmp_path):
    files = _some_images(synthetic_data, 4)
    out = tmp_path / "sub" / "pred.json"
    status = main(["predict", str(trained_run), *map(str, files), "--output", str(out), "--quiet"])
    assert status == 0
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in files]
    expected = _expected(trained_run, files)
    for row in rows:
        assert set(row) == set(FIELDS)
        assert 0.0 <= row["probability"] <= 1.0
        assert row["probability"] == pytest.approx(expected[row["path"]], abs=1e-6)
        assert row["error"] == ""
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary left


def test_table_on_stdout_and_missing_paths(trained_run, synthetic_data, tmp_path, capsys):
    files = _some_images(synthetic_data, 2)
    missing = tmp_path / "nowhere.png"
    status = main(["predict", str(trained_run), *map(str, files), str(missing), "--quiet"])
    assert status == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["probability", "label", "path"]
    assert len(lines) == 3 and all(str(f) in captured.out for f in files)
    assert f"{missing}: no such file or folder" in captured.err


def test_mistyped_paths_alone_leave_an_earlier_output_as_it_was(trained_run, synthetic_data,
                                                               tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert main(["predict", str(trained_run), str(_some_images(synthetic_data, 1)[0]),
                 "--output", str(out), "--quiet"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    typo, glob = tmp_path / "typo_folder", str(tmp_path / "*.jpgg")
    assert main(["predict", str(trained_run), str(typo), glob, "--output", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pneumoscan predict: {typo}: no such file or folder",
                   f"pneumoscan predict: {glob}: no files match this pattern"]
    assert out.read_bytes() == before  # not replaced by a file of no rows


def test_bad_output_extension_is_one_line(trained_run, synthetic_data, tmp_path, capsys):
    files = _some_images(synthetic_data, 1)
    status = main(["predict", str(trained_run), str(files[0]), "--output", str(tmp_path / "x.txt")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".csv or .json" in err[0]


def test_folders_globs_hidden_and_symlink_loops(tmp_path, synthetic_data):
    src = _some_images(synthetic_data, 3)
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    deep = Path(shutil.copy(src[0], root / "a" / "b" / "deep.png"))
    top = Path(shutil.copy(src[1], root / "top.png"))
    shutil.copy(src[2], root / ".hidden.png")
    shutil.copy(src[2], root / ".hidden_dir" / "inside.png")
    no_suffix = root / "a" / "scan0001"  # an image without an extension, found by content
    no_suffix.write_bytes(src[2].read_bytes())
    (root / "a" / "README.txt").write_text("notes\n")
    os.symlink(root, root / "a" / "loop")  # a cycle: followed once at most

    inputs = expand_paths([root])
    assert sorted(inputs.files) == sorted([deep, top, no_suffix])
    assert inputs.skipped == 1 and not inputs.missing

    inputs = expand_paths([str(root / "a" / "b" / "*.png"), top, str(root / "*.png")])
    assert inputs.files == [deep, top]  # in the order given, duplicates removed
    # A glob may pass through the link (as a shell's would), but each file gives one row.
    inputs = expand_paths([top, str(root / "a" / "*" / "*.png")])
    assert inputs.files == [top, deep]
    inputs = expand_paths([str(root / "nothing*.png")])
    assert inputs.files == [] and inputs.missing[0][1] == "no files match this pattern"
    # '**' follows no folder symlink (as bash's does not): the loop gave ever longer paths
    # until one could not be resolved, a bogus error row, and every level was walked again.
    for pattern in ("**", "**/*.png"):
        inputs = expand_paths([str(root / pattern)])
        assert all("loop" not in p.parts for p in inputs.files), (pattern, inputs.files)
    # 'a/**' matches a/ itself, which is walked: a walk follows no link up to a folder above.
    assert sorted(expand_paths([str(root / "a" / "**")]).files) == sorted([deep, no_suffix])
    assert sorted(expand_paths([str(root / "**")]).files) == sorted([deep, top, no_suffix])
    assert sorted(expand_paths([str(root / "**" / "*.png")]).files) == sorted([deep, top])


def test_many_files_stream_in_batches(trained_run, synthetic_data):
    files = sorted((synthetic_data / "train").rglob("*.png"))[:20]
    rows = predict_files(load_predictor(trained_run), files, batch_size=6)
    assert [r.path for r in rows] == [str(p) for p in files]
    by_batch_of_one = predict_files(load_predictor(trained_run), files[:5], batch_size=1)
    for a, b in zip(rows, by_batch_of_one, strict=False):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)


def test_ensemble_run_predicts_the_mean(trained_run, synthetic_data, tmp_path, capsys):
    ensemble = _ensemble_of(trained_run, tmp_path / "ens")
    files = _some_images(synthetic_data, 3)
    out = tmp_path / "ens.json"
    assert main(["predict", str(ensemble), *map(str, files), "--output", str(out),
                 "--quiet"]) == 0
    rows = json.loads(out.read_text())
    expected = _expected(trained_run, files)  # both members are the same model
    for row in rows:
        assert row["probability"] == pytest.approx(expected[row["path"]], abs=1e-6)


def _ensemble_of(run: Path, out: Path) -> Path:
    out.mkdir()
    for name in ("m0", "m1"):
        shutil.copytree(run, out / name)
    meta = read_meta(run)
    save_meta(out, {"kind": "ensemble", "members": ["m0", "m1"], "class_names": meta["class_names"],
                    "image_size": meta["image_size"], "threshold": meta["threshold"],
                    "temperature": 1.0})
    return out


def test_cam_overlays_for_predicted_files(trained_run, mixed_folder, tmp_path, capsys):
    pytest.importorskip("pneumoscan.explain", reason="Grad-CAM module not available")
    folder, good, _bad = mixed_folder
    cams = tmp_path / "cams"
    status = main(["predict", str(trained_run), str(folder), "--cam", str(cams), "--quiet",
                   "--output", str(tmp_path / "p.csv")])
    assert status == 2  # the bad files still fail
    # seed_cnn at 32 px has one cell on its Grad-CAM layer: the maps show no place.
    assert capsys.readouterr().err.count("warning: --cam: Grad-CAM's layer features.block4 "
                                         "gives a 1 x 1 grid at 32 px") == 1
    written = sorted(cams.rglob("*.png"))
    assert len(written) == len(good)
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")


def _dicom_from_jpeg(jpeg: Path, out: Path) -> Path:
    """MONOCHROME1, 16 bits allocated, 12 stored: x12 = round(gray / 255 * 4095), inverted."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    gray = read_gray(jpeg).astype(np.float64)
    x12 = np.rint(gray / 255.0 * 4095.0).astype(np.uint16)
    stored = (4095 - x12).astype(np.uint16)  # MONOCHROME1: bright is low

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out


def test_dicom_predicts_like_the_jpeg_it_came_from(trained_run, tmp_path):
    if not REAL_JPEG.is_file():
        pytest.skip(f"real X-ray not available at {REAL_JPEG}")
    dicom = _dicom_from_jpeg(REAL_JPEG, tmp_path / "IM-0115-0001.dcm")
    # The pixels agree (MONOCHROME1 inverted, 12 bits scaled back) before the model sees them,
    # so the comparison below holds for any model, not only for a flat one.
    full = read_gray(REAL_JPEG).astype(int) - read_gray(dicom).astype(int)
    assert np.abs(full).max() <= 1
    size = load_predictor(trained_run).image_size
    small = read_gray(REAL_JPEG, size).astype(int) - read_gray(dicom, size).astype(int)
    assert np.abs(small).mean() < 1.0
    out = tmp_path / "both.json"
    assert main(["predict", str(trained_run), str(REAL_JPEG), str(dicom), "--output", str(out),
                 "--quiet"]) == 0
    jpeg_row, dicom_row = json.loads(out.read_text())
    assert dicom_row["error"] == "" and jpeg_row["error"] == ""
    assert dicom_row["probability"] == pytest.approx(jpeg_row["probability"], abs=1e-3)
    # A tiny model can put this image right at its threshold, where float noise alone picks the
    # side; the labels must agree whenever the probability is clear of the threshold.
    if abs(jpeg_row["probability"] - jpeg_row["threshold"]) > 1e-3:
        assert dicom_row["label"] == jpeg_row["label"]


@pytest.fixture
def same_stems(tmp_path, synthetic_data) -> tuple[list[Path], Path]:
    """dup/x.png, dup/a/x.jpeg, dup/b/x.jpeg (one stem, told apart by their sizes) and a bad file.

    An overlay keeps its file's aspect ratio, so its size shows which input it was made from.
    """
    from PIL import Image

    gray = read_gray(_some_images(synthetic_data, 1)[0])
    folder = tmp_path / "dup"
    files = []
    for name, size in (("x.png", (300, 300)), ("a/x.jpeg", (400, 260)), ("b/x.jpeg", (260, 500))):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray).resize(size).save(path)
        files.append(path)
    bad = folder / "b" / "y.png"
    bad.write_text("not an image\n")
    return files, bad


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_cam_column_names_each_files_overlay(trained_run, same_stems, tmp_path, fmt):
    pytest.importorskip("captum")
    from PIL import Image

    files, bad = same_stems
    cams, out = tmp_path / "cams", tmp_path / f"p.{fmt}"
    status = main(["predict", str(trained_run), *map(str, [files[0], bad, *files[1:]]), "--cam",
                   str(cams), "--output", str(out), "--quiet", "--batch-size", "2"])
    assert status == 2  # the bad file
    if fmt == "csv":
        with open(out, newline="") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == (*FIELDS, "cam")  # documented columns first
            rows = {row["path"]: row for row in reader}
        assert rows[str(bad)]["cam"] == ""
    else:
        rows = {row["path"]: row for row in json.loads(out.read_text())}
        assert list(rows[str(bad)]) == [*FIELDS, "cam"] and rows[str(bad)]["cam"] is None
    names = [Path(rows[str(path)]["cam"]) for path in files]
    assert [n.name for n in names] == ["x_gradcam.png", "x-2_gradcam.png", "x-3_gradcam.png"]
    for path, cam in zip(files, names, strict=True):
        assert cam.parent == cams
        with Image.open(path) as src, Image.open(cam) as im:
            assert im.size == src.size  # this file's overlay, not another x's


def test_cam_in_the_table_and_no_cam_column_without_cam(trained_run, same_stems, tmp_path,
                                                        capsys):
    pytest.importorskip("captum")
    files, _ = same_stems
    cams = tmp_path / "cams"
    assert main(["predict", str(trained_run), *map(str, files), "--cam", str(cams),
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].endswith(f"{files[0]}  -> {cams / 'x_gradcam.png'}")
    assert lines[3].endswith(f"{files[2]}  -> {cams / 'x-3_gradcam.png'}")
    out = tmp_path / "p.json"
    assert main(["predict", str(trained_run), str(files[0]), "--output", str(out),
                 "--quiet"]) == 0
    assert list(json.loads(out.read_text())[0]) == list(FIELDS)


def test_cam_folder_blocked_by_a_file_is_one_line_before_any_row(trained_run, same_stems,
                                                                 tmp_path, capsys):
    pytest.importorskip("captum")
    files, _ = same_stems
    blocker = tmp_path / "cams"
    blocker.write_text("notes")
    assert main(["predict", str(trained_run), str(files[0]), "--cam", str(blocker),
                 "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no table header printed ahead of the refusal
    assert err.strip() == f"pneumoscan predict: error: {blocker}: exists and is not a folder"
    assert blocker.read_text() == "notes"


def test_no_progress_bar_when_stderr_is_not_a_terminal(trained_run, synthetic_data, capsys,
                                                       monkeypatch):
    import io
    import sys

    from pneumoscan.predict import iter_predictions

    predictor = load_predictor(trained_run)
    files = _some_images(synthetic_data, 3)
    assert len(list(iter_predictions(predictor, files, progress=True))) == 3
    assert capsys.readouterr().err == ""  # redirected: no carriage-return lines in the file

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert len(list(iter_predictions(predictor, files, progress=True))) == 3
    assert "predict" in terminal.getvalue()  # a terminal still gets its bar
    terminal.truncate(0)
    assert len(list(iter_predictions(predictor, files, progress=False))) == 3
    assert terminal.getvalue() == ""  # --quiet


def test_a_missing_run_says_it_does_not_exist(synthetic_data, tmp_path, capsys):
    files = _some_images(synthetic_data, 1)
    assert main(["predict", str(tmp_path / "nosuchrun"), str(files[0]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("nosuchrun: not a run directory (does not exist)")


@pytest.fixture
def latin1_image(tmp_path, synthetic_data) -> Path:
    """An image whose file name is Latin-1, not UTF-8: b"R\\xf6ntgen.png" (Röntgen)."""
    folder = tmp_path / "latin"
    folder.mkdir()
    name = os.fsdecode(b"R\xf6ntgen.png")  # a lone surrogate stands for the byte 0xf6
    try:
        return Path(shutil.copy(_some_images(synthetic_data, 1)[0], folder / name))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 file names")


def test_a_file_name_that_is_not_utf8_in_csv_json_and_table(trained_run, latin1_image,
                                                            tmp_path, capsys):
    raw = os.fsencode(latin1_image)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(trained_run), str(latin1_image.parent), "--output", str(out),
                 "--quiet"]) == 0
    data = out.read_bytes()
    assert raw in data  # the name's original bytes, so the row finds its file again
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        (row,) = csv.DictReader(f)
    assert Path(row["path"]) == latin1_image and row["label"] and not row["error"]

    out = tmp_path / "pred.json"
    assert main(["predict", str(trained_run), str(latin1_image), "--output", str(out),
                 "--quiet"]) == 0
    (record,) = json.loads(out.read_bytes().decode("ascii"))  # escaped: plain ASCII JSON
    assert os.fsencode(record["path"]) == raw

    capsys.readouterr()
    assert main(["predict", str(trained_run), str(latin1_image), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()  # capsys' stdout is strict UTF-8
    assert lines[1].endswith(os.path.join(str(latin1_image.parent), "R\\xf6ntgen.png"))


def test_a_non_finite_probability_is_an_error_row(trained_run, synthetic_data, tmp_path,
                                                  monkeypatch, capsys):
    """A NaN probability printed as NORMAL, and as NaN made the JSON file invalid."""
    from pneumoscan.model_io import Predictor
    from pneumoscan.predict import NOT_FINITE

    files = _some_images(synthetic_data, 3)
    real_proba = Predictor.predict_proba

    def one_nan(self, images):
        p = real_proba(self, images)
        p[1] = np.nan
        return p

    monkeypatch.setattr(Predictor, "predict_proba", one_nan)
    out = tmp_path / "pred.json"
    assert main(["predict", str(trained_run), *map(str, files), "--output", str(out),
                 "--quiet"]) == 2

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    rows = json.loads(out.read_text(), parse_constant=refuse)
    assert [r["error"] for r in rows] == ["", NOT_FINITE, ""]
    assert rows[1]["probability"] is None and rows[1]["label"] == ""
    err = [line for line in capsys.readouterr().err.splitlines() if NOT_FINITE in line]
    assert len(err) == 1 and str(files[1]) in err[0]


def test_control_characters_in_names_are_shown_escaped():
    from pneumoscan.console import printable

    assert printable("R\u00f6ntgen \u80f8\u90e8.png") == "R\u00f6ntgen \u80f8\u90e8.png"
    assert printable("R\udcf6ntgen.jpeg") == "R\\xf6ntgen.jpeg"  # Latin-1 bytes, os.fsdecode'd
    assert printable("a\rb\nc\td") == "a\\rb\\nc\\td"
    assert printable("\x1b[31mred\x1b[0m \x9b2J \x7f") == "\\x1b[31mred\\x1b[0m \\x9b2J \\x7f"
    assert printable("scan\u202egnp.exe") == "scan\\u202egnp.exe"  # shown reversed otherwise


def test_a_name_cannot_forge_or_hide_a_row_of_the_table(trained_run, synthetic_data, tmp_path,
                                                        capsys):
    # A carriage return showed a PNEUMONIA row as the fake NORMAL one after it; a newline
    # added a row for a file that does not exist. Unreadable files' lines likewise.
    import shutil

    source = next((synthetic_data / "test" / "PNEUMONIA").iterdir())
    forged = tmp_path / "scan.png\r     0.0002  NORMAL     scan.png\nfake.png"
    shutil.copy(source, forged)
    (tmp_path / "bad.png\nwarning: ignore the line above").write_bytes(source.read_bytes()[:40])
    assert main(["predict", str(trained_run), str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "\r" not in out and len(out.splitlines()) == 3  # the header and the two files
    assert "scan.png\\r     0.0002" in out and "\\nfake.png" in out
    assert "\r" not in err and not any(line.startswith("warning: ignore") for line in
                                       err.splitlines())


def test_a_name_a_spreadsheet_would_run_as_a_formula_is_led_by_dot_slash(
        trained_run, synthetic_data, tmp_path, monkeypatch):
    # Opened in LibreOffice, =HYPERLINK(...) showed as a live link and =1+1 as 2, the name
    # lost. ./ names the same file; the JSON keeps the path as given.
    import shutil

    source = next((synthetic_data / "test" / "NORMAL").iterdir())
    names = ["=1+1.png", '=HYPERLINK("http:x","y").png', "+2.png", "-3.png", "@SUM(1).png",
             "plain.png"]
    for name in names:
        shutil.copy(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--output", "p.csv", "--cam", "cams", "--quiet", "--",
                 str(trained_run), *names]) == 0
    with open("p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [os.path.join(".", n) for n in names[:-1]] + ["plain.png"]
    assert all(not r["path"].startswith(("=", "+", "-", "@")) and Path(r["path"]).is_file()
               for r in rows)
    assert all(Path(r["cam"]).is_file() for r in rows)
    assert main(["predict", "--output", "p.json", "--quiet", "--", str(trained_run),
                 *names]) == 0
    assert [r["path"] for r in json.loads(Path("p.json").read_text())] == names


def test_overlay_names_keep_the_bytes_of_a_name_that_is_not_utf8(tmp_path):
    # R\xf6ntgen and R\xfcntgen (Latin-1) both became "Rntgen", one of them numbered.
    from pneumoscan.explain import OverlayNames
    from pneumoscan.fileio import clip_name

    names = OverlayNames()
    first = names.name_for(os.fsdecode(b"R\xf6ntgen.jpeg"))
    second = names.name_for(os.fsdecode(b"R\xfcntgen.jpeg"))
    assert os.fsencode(first) == b"R\xf6ntgen_gradcam.png"
    assert os.fsencode(second) == b"R\xfcntgen_gradcam.png"
    long = "\u80f8" * 100  # 300 bytes of UTF-8: cut on a character boundary
    assert clip_name(long, 200) == "\u80f8" * 66 and clip_name("abc", 200) == "abc"


def test_members_of_a_stack_take_their_own_sizes_decode(tmp_path):
    # A member trained at 32 px learned from images decoded at 32 px; resized from a 48 px
    # decode they differ by a grey level or so, which moved probabilities by tenths.
    import torch

    from pneumoscan.model_io import EnsemblePredictor, Predictor, input_sizes
    from pneumoscan.models import create_model

    if not REAL_JPEG.is_file():
        pytest.skip(f"real X-ray not available at {REAL_JPEG}")

    def member(size: int) -> Predictor:
        torch.manual_seed(size)
        model = create_model("resnet10t", in_chans=1, image_size=size).eval()
        meta = {"architecture": "resnet10t", "image_size": size, "in_chans": 1,
                "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 0.05}
        return Predictor(tmp_path, meta, model, torch.device("cpu"))

    small, large = member(32), member(48)
    stack = EnsemblePredictor(tmp_path, {"kind": "ensemble", "image_size": 48, "threshold": 0.5,
                                         "temperature": 1.0}, [small, large])
    assert input_sizes(stack) == (32, 48)
    rows = predict_files(stack, [REAL_JPEG])
    expected = (small.predict_proba(read_gray(REAL_JPEG, 32)[None])[0]
                + large.predict_proba(read_gray(REAL_JPEG, 48)[None])[0]) / 2
    assert rows[0].probability == pytest.approx(expected, abs=1e-9)
    resized = stack.predict_proba(read_gray(REAL_JPEG, 48)[None])[0]  # the old way
    assert abs(resized - expected) > 1e-4  # the two ways differ: the test can tell them apart


def test_evaluate_gives_each_member_of_a_mixed_size_ensemble_its_own_decode(synthetic_data,
                                                                            tmp_path, capsys):
    import torch

    from pneumoscan import CLASS_NAMES
    from pneumoscan.data.dataset import load_eval_split
    from pneumoscan.evaluate import evaluate_predictions
    from pneumoscan.model_io import save_model
    from pneumoscan.models import create_model

    run = tmp_path / "mixed"
    for size in (32, 48):
        torch.manual_seed(size)
        save_model(run / f"m{size}", create_model("resnet10t", in_chans=1, image_size=size).eval(),
                   {"architecture": "resnet10t", "image_size": size, "in_chans": 1,
                    "class_names": list(CLASS_NAMES),
                    "intensity": {"scale": 1 / 255, "mean": 0.5, "std": 0.25},
                    "threshold": 0.5, "temperature": 0.05})
    save_meta(run, {"kind": "ensemble", "members": ["m32", "m48"], "image_size": 48,
                    "class_names": list(CLASS_NAMES), "threshold": 0.5, "temperature": 1.0})
    # A faint image: blank once libjpeg reduces it for 32 px, readable at 48 px. It is left out
    # of both, and said, rather than the sizes' images no longer matching.
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    from PIL import Image

    faint = np.full((1024, 1024), 100, np.uint8)
    faint[500:502, 500:502] = 106
    Image.fromarray(faint).save(data / "test" / "NORMAL" / "faint.jpeg", quality=95)
    assert read_gray(data / "test" / "NORMAL" / "faint.jpeg", 48).shape == (48, 48)
    out = tmp_path / "figures.json"
    assert main(["evaluate", str(run), "--data", str(data), "--json", str(out), "--quiet"]) == 0
    assert "1 file(s) could be read at some of the members' image sizes only" in (
        capsys.readouterr().err)
    predictor = load_predictor(run)
    own = [m.predict_proba(load_eval_split(str(synthetic_data), m.image_size).split.images)
           for m in predictor.members]
    split = load_eval_split(str(synthetic_data), 48).split
    expected = evaluate_predictions(split.labels, (own[0] + own[1]) / 2, 0.5)
    assert json.loads(out.read_text())["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_an_overlay_that_cannot_be_written_costs_only_its_cell(trained_run, synthetic_data,
                                                               tmp_path, monkeypatch, capsys):
    """A full disk under --cam ended predict at the first overlay: no --output file, nothing
    printed, the predictions of every file lost."""
    import errno

    import pneumoscan.fileio as fileio

    real = fileio.atomic_write_bytes

    def full_for_overlays(path, data):
        if str(path).endswith("_gradcam.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(fileio, "atomic_write_bytes", full_for_overlays)
    files = sorted((synthetic_data / "test" / "NORMAL").iterdir())[:3]
    out = tmp_path / "p.csv"
    status = main(["predict", str(trained_run), *map(str, files), "--cam", str(tmp_path / "c"),
                   "--output", str(out), "--quiet"])
    assert status == 2
    rows = out.read_text().splitlines()
    assert len(rows) == 4 and all(row.endswith(",") for row in rows[1:])  # no cam, each file
    err = capsys.readouterr().err
    assert err.count("no Grad-CAM overlay (cannot write") == 3 and "Traceback" not in err
