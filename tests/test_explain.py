"""Grad-CAM: hooks removed, maps in [0, 1] at the image size, and peaks on the evidence.

The localisation test trains a tiny network on a task whose label depends only on a bright
6x6 blob at a random position, so the only place the evidence for class 1 can be is the blob.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("captum")

from pneumoscan.cli import main  # noqa: E402
from pneumoscan.explain import (  # noqa: E402
    DISPLAY_MAX_SIDE,
    DISPLAY_MIN_SIDE,
    OverlayNames,
    gradcam,
    overlay,
    overlay_png,
    write_overlays,
)
from pneumoscan.model_io import EnsemblePredictor, Predictor, load_predictor  # noqa: E402
from pneumoscan.models import create_model, register_model  # noqa: E402

SIZE, BLOB, N_PER_CLASS = 32, 6, 64
NO_EVIDENCE = "no evidence for PNEUMONIA on this layer (an all-blue map)"


class BlobNet(nn.Module):
    """Two convolutions at full resolution, then a global max: made to find one bright spot."""

    gradcam_layer = "features"

    def __init__(self, in_chans: int = 1, num_classes: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


@register_model
def blob_test_net(in_chans: int = 1, num_classes: int = 2, **_) -> nn.Module:
    return BlobNet(in_chans, num_classes)


def blob_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (2n, S, S) noisy backgrounds; class 1 has a bright blob. Returns images, labels,
    and each blob's top-left corner (-1 for class 0)."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    images = rng.normal(rng.uniform(60, 110, size=(n, 1, 1)), 18, size=(n, SIZE, SIZE))
    labels = np.repeat([0, 1], n_per_class)
    corners = np.full((n, 2), -1)
    for i in np.flatnonzero(labels == 1):
        r, c = rng.integers(0, SIZE - BLOB + 1, size=2)
        images[i, r : r + BLOB, c : c + BLOB] += 130
        corners[i] = r, c
    return np.clip(images, 0, 255).astype(np.uint8), labels, corners


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory) -> Path:
    """A BlobNet trained with the project's fit() and saved as a run directory."""
    from pneumoscan.config import AugmentConfig, TrainConfig
    from pneumoscan.data.dataset import Split
    from pneumoscan.model_io import save_model
    from pneumoscan.train import fit

    run_dir = tmp_path_factory.mktemp("blob") / "run"
    run_dir.mkdir()
    images, labels, _ = blob_images(N_PER_CLASS, seed=0)
    val_images, val_labels, _ = blob_images(8, seed=1)
    cfg = TrainConfig(
        data="generated", out=str(run_dir), model="blob_test_net", image_size=SIZE, in_chans=1,
        mean=0.3, std=0.2, epochs=8, batch_size=16, lr=1e-2, optimizer="adam",
        augment=AugmentConfig(rotation_deg=0.0, zoom=0.0, shift=0.0), class_weights=False,
        early_stop_patience=0, restore_best=False, device="cpu", compile=False,
    )

    def split(x, y):
        return Split(x, y.astype(np.int64), [f"p{i}" for i in range(len(y))],
                     [f"img{i}.png" for i in range(len(y))])

    result = fit(cfg, split(images, labels), split(val_images, val_labels), run_dir,
                 class_counts=np.bincount(labels), progress=False)
    assert result.history[-1]["val_accuracy"] >= 0.9, result.history  # it learned the task
    save_model(run_dir, result.model, {
        "architecture": cfg.model, "image_size": SIZE, "in_chans": 1,
        "class_names": ["NORMAL", "PNEUMONIA"],
        "intensity": {"scale": 1 / 255, "mean": cfg.mean, "std": cfg.std},
        "threshold": 0.5, "temperature": 1.0,
    })
    return run_dir


@pytest.fixture(scope="module")
def blob_predictor(blob_run) -> Predictor:
    return load_predictor(blob_run, "cpu")


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


def _seed_cnn_predictor(tmp_path: Path) -> Predictor:
    model = create_model("seed_cnn", in_chans=3, image_size=SIZE).eval()
    meta = {"architecture": "seed_cnn", "image_size": SIZE, "in_chans": 3,
            "intensity": {"mean": 0.0, "std": 1.0}, "threshold": 0.5, "temperature": 1.0}
    return Predictor(tmp_path, meta, model, torch.device("cpu"))


@pytest.mark.parametrize("which", ["blob", "seed_cnn"])
def test_gradcam_map_shape_range_and_no_hooks_left(which, blob_predictor, tmp_path):
    predictor = blob_predictor if which == "blob" else _seed_cnn_predictor(tmp_path)
    images, _, _ = blob_images(3, seed=2)
    assert _hooks(predictor.model) == 0
    with torch.no_grad():  # as prediction runs: Grad-CAM must still get its gradients
        maps = gradcam(predictor, images)
    assert maps.shape == images.shape and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    if which == "blob":  # trained: evidence somewhere, scaled to a peak of 1
        assert (maps.reshape(len(maps), -1).max(axis=1) > 0.99).any()
    assert _hooks(predictor.model) == 0
    assert not predictor.model.training
    assert all(p.grad is None for p in predictor.model.parameters())  # nothing accumulated


def test_gradcam_peaks_on_the_blob(blob_predictor):
    images, labels, corners = blob_images(20, seed=3)
    positive = labels == 1
    maps = gradcam(blob_predictor, images[positive])
    margin, hits = 3, 0
    for cam, (r, c) in zip(maps, corners[positive], strict=True):
        pr, pc = np.unravel_index(np.argmax(cam), cam.shape)
        hits += (r - margin <= pr < r + BLOB + margin) and (c - margin <= pc < c + BLOB + margin)
    assert hits / positive.sum() >= 0.7, f"peak on the blob for {hits}/{positive.sum()} images"


def test_gradcam_empty_batch_and_bad_input(blob_predictor):
    assert gradcam(blob_predictor, np.zeros((0, SIZE, SIZE), np.uint8)).shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match="uint8"):
        gradcam(blob_predictor, np.zeros((2, SIZE, SIZE), np.float32))


def _flat_predictor(run_dir: Path, meta: dict) -> Predictor:
    """A BlobNet with every weight zero: no evidence anywhere, an all-zero map."""
    model = BlobNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return Predictor(run_dir, meta, model, torch.device("cpu"))


def _halves_predictor(run_dir: Path) -> Predictor:
    meta = {"architecture": "shared", "image_size": SIZE, "in_chans": 1,
            "intensity": {"mean": 0.0, "std": 1.0}, "threshold": 0.5, "temperature": 1.0}
    return Predictor(run_dir, meta, _SharedEvidenceNet().eval(), torch.device("cpu"))


def _stack(run_dir: Path, meta: dict, members: list, coef: list[float]) -> EnsemblePredictor:
    return EnsemblePredictor(run_dir, {**meta, "kind": "stack",
                                       "stacker": {"coef": coef, "intercept": 0.0}}, members)


def _peak_one(maps: np.ndarray) -> np.ndarray:
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0.0)


def test_gradcam_of_an_ensemble_is_the_members_mean_and_of_a_stack_weighted(blob_predictor,
                                                                           blob_run):
    images, _, _ = blob_images(2, seed=4)
    single = gradcam(blob_predictor, images)
    flat = _flat_predictor(blob_run, blob_predictor.meta)
    assert gradcam(flat, images).max() == 0.0
    ensemble = EnsemblePredictor(blob_run, {**blob_predictor.meta, "kind": "ensemble"},
                                 [blob_predictor, flat])
    np.testing.assert_allclose(gradcam(ensemble, images), single, atol=1e-6)  # peak 1 again
    # A stack weighs each member's map by its coefficient; a negative one is left out.
    halves = gradcam(_halves_predictor(blob_run), images)
    members = [blob_predictor, _halves_predictor(blob_run)]
    for coef, share in (([3.0, 1.0], 0.75), ([1.0, -2.0], 1.0), ([-1.0, -1.0], 0.5)):
        stack = _stack(blob_run, blob_predictor.meta, members, coef)
        expected = _peak_one(single * share + halves * (1 - share))
        np.testing.assert_allclose(gradcam(stack, images), expected, atol=1e-5)


def test_an_ensembles_map_peaks_at_one_as_a_single_models_does(blob_predictor, blob_run):
    """Each member's map was scaled to peak 1, then averaged and left so: where the members'
    peaks lie apart, the mean peaked at 0.5-0.8, and red meant something else than for one
    model. An ensemble with no evidence anywhere must still be all zeros, not divided by 0."""
    images, labels, _ = blob_images(4, seed=13)
    members = [blob_predictor, _halves_predictor(blob_run)]
    for meta in ({**blob_predictor.meta, "kind": "ensemble"},
                 {**blob_predictor.meta, "kind": "stack",
                  "stacker": {"coef": [1.0, 2.0], "intercept": 0.0}}):
        maps = gradcam(EnsemblePredictor(blob_run, meta, members), images)
        np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-6)
    flat = _flat_predictor(blob_run, blob_predictor.meta)
    nothing = EnsemblePredictor(blob_run, {**blob_predictor.meta, "kind": "ensemble"},
                                [flat, flat])
    maps = gradcam(nothing, images)
    assert maps.dtype == np.float32 and not maps.any()


def test_overlay_shapes_dtypes_and_blend():
    image = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # (40, 64)
    cam = np.zeros((10, 16), np.float32)
    cam[2:5, 3:6] = 1.0
    rgb = overlay(image, cam)
    assert rgb.shape == (40, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, cam, alpha=0.0)[..., 0], image)
    hot = overlay(np.zeros((8, 8), np.uint8), np.ones((8, 8)), alpha=1.0)
    cold = overlay(np.zeros((8, 8), np.uint8), np.zeros((8, 8)), alpha=1.0)
    assert hot[..., 0].mean() > hot[..., 2].mean()  # jet: high = red
    assert cold[..., 2].mean() > cold[..., 0].mean()  # low = blue
    with pytest.raises(ValueError, match="shape"):
        overlay(np.zeros((2, 8, 8), np.uint8), cam)
    png = overlay_png(image, cam)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 40)


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_write_overlays_reports_each_file(blob_predictor, tmp_path):
    images, _, _ = blob_images(1, seed=5)
    good = _write_png(tmp_path / "in" / "a.png", images[0])
    same_stem = _write_png(tmp_path / "in" / "sub" / "a.png", images[1])
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    results = write_overlays(blob_predictor, [good, bad, same_stem], tmp_path / "out")
    assert [r.path for r in results] == [str(good), str(bad), str(same_stem)]
    assert results[0].error is None and results[2].error is None and results[1].error
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a-2_gradcam.png", "a_gradcam.png"]  # same stem: neither overwritten
    # Each result names its own overlay, so numbered names can be told apart.
    assert [r.file for r in results] == [tmp_path / "out" / "a_gradcam.png", None,
                                         tmp_path / "out" / "a-2_gradcam.png"]
    with Image.open(tmp_path / "out" / "a_gradcam.png") as im:
        assert im.size == (DISPLAY_MIN_SIDE, DISPLAY_MIN_SIDE) and im.mode == "RGB"  # from SIZE


def test_names_stay_unique_across_calls_that_share_their_names(blob_predictor, tmp_path):
    # predict --cam writes a batch at a time: the numbering must be as in one call.
    images, _, _ = blob_images(1, seed=8)
    first = _write_png(tmp_path / "in" / "x.png", images[0])
    second = _write_png(tmp_path / "in" / "a" / "x.png", images[1])
    names = OverlayNames(tmp_path / "out")
    (one,) = write_overlays(blob_predictor, [first], tmp_path / "out", names=names)
    (two,) = write_overlays(blob_predictor, [second], tmp_path / "out", names=names)
    assert (one.file.name, two.file.name) == ("x_gradcam.png", "x-2_gradcam.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x-2_gradcam.png", "x_gradcam.png"]


def test_a_later_call_never_overwrites_another_files_overlay(blob_predictor, tmp_path):
    # Two patients' files share a name, explained in two calls into one folder: the first
    # overlay (which an earlier results file names) keeps its picture; the same file explained
    # again brings its own overlay up to date; a user's file of that name is never replaced.
    from pneumoscan.explain import SOURCE_KEY, overlay_source

    images, _, _ = blob_images(1, seed=11)
    a = _write_png(tmp_path / "A" / "IM0001.png", images[0])
    b = _write_png(tmp_path / "B" / "IM0001.png", images[1])
    out = tmp_path / "cams"
    (first,) = write_overlays(blob_predictor, [a], out)
    before = first.file.read_bytes()
    (second,) = write_overlays(blob_predictor, [b], out)
    assert (first.file.name, second.file.name) == ("IM0001_gradcam.png", "IM0001-2_gradcam.png")
    assert first.file.read_bytes() == before
    with Image.open(second.file) as im:
        assert im.info[SOURCE_KEY] == overlay_source(b)  # the overlay names its input
    (again,) = write_overlays(blob_predictor, [a], out)
    assert again.file == first.file  # its own overlay, rewritten in place
    first.file.unlink()  # a gap before B's: B's own overlay is still found and rewritten
    (b_again,) = write_overlays(blob_predictor, [b], out)
    assert b_again.file == second.file and not first.file.exists()
    write_overlays(blob_predictor, [a], out)
    assert sorted(p.name for p in out.iterdir()) == ["IM0001-2_gradcam.png", "IM0001_gradcam.png"]
    mine = out / "c_gradcam.png"
    mine.write_text("my notes")
    c = _write_png(tmp_path / "c.png", images[0])
    (third,) = write_overlays(blob_predictor, [c], out)
    assert third.file.name == "c-2_gradcam.png" and mine.read_text() == "my notes"


@pytest.mark.parametrize("stem", ["ab", "a\nb", "x-2"])
def test_an_inputs_own_overlay_is_found_whatever_its_number_and_name(stem, tmp_path):
    from pneumoscan.explain import overlay_source

    def drawn(name: str, source: Path | None) -> None:
        png = overlay_png(np.full((8, 8), 9, np.uint8), np.zeros((8, 8)),
                          None if source is None else overlay_source(source))
        (tmp_path / name).write_bytes(png)

    own, other = tmp_path / "in" / f"{stem}.png", tmp_path / "other" / f"{stem}.png"
    drawn(f"{stem}_gradcam.png", None)  # someone else's file
    drawn(f"{stem}-2_gradcam.png", own)
    drawn(f"{stem}-10_gradcam.png", own)  # the same input twice, from an earlier call
    drawn(f"{stem}-3_gradcam.png", other)
    names = OverlayNames(tmp_path)
    assert names.name_for(own) == f"{stem}-2_gradcam.png"  # its own, the lowest number first
    assert names.name_for(other) == f"{stem}-3_gradcam.png"
    assert OverlayNames(tmp_path).name_for(tmp_path / "new" / f"{stem}.png") == (
        f"{stem}-4_gradcam.png")


def test_files_named_by_their_uid_keep_the_whole_name(blob_run, tmp_path, capsys):
    # DICOMs named by their instance UID differ only after the last dot, which a stem drops.
    images, _, _ = blob_images(1, seed=12)
    uids = [tmp_path / "in" / f"1.2.826.0.1.3680043.8.498.{n}" for n in (100, 101)]
    for uid, image in zip(uids, images, strict=True):
        uid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(uid, format="PNG")  # no image extension: found by content
    out = tmp_path / "out"
    assert main(["explain", str(blob_run), str(tmp_path / "in"), "--out",
                 str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{u.name}_gradcam.png" for u in uids]
    lines = capsys.readouterr().out.splitlines()
    for uid in uids:  # each input's line says which overlay is its own
        own = f"{uid}  -> {out / (uid.name + '_gradcam.png')}  "
        assert any(line.startswith(own) for line in lines), lines


def test_long_file_names_get_overlays_too(blob_predictor, tmp_path):
    """Names near the 255-byte limit are legal, but the overlay's suffix and the temporary name
    it is written under made them too long: the whole command stopped, overlays and all."""
    images, _, _ = blob_images(1, seed=9)
    stems = ["a" * 250, "\u80ba" * 78, "\u80ba" * 78 + "b"]  # 250 bytes; 234 bytes of UTF-8
    paths = [_write_png(tmp_path / "in" / f"{stem}.png", images[i % 2])
             for i, stem in enumerate(stems)]
    results = write_overlays(blob_predictor, paths, tmp_path / "out")
    assert [r.error for r in results] == [None, None, None]
    names = [r.file.name for r in results]
    assert len(set(names)) == 3 and all(len(n.encode()) <= 255 for n in names)
    assert all(n.endswith("_gradcam.png") for n in names)
    assert names[0].startswith("a" * 200) and names[1].startswith("\u80ba" * 70)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)


def test_overlays_keep_the_file_shape_up_to_a_readable_size(blob_predictor, tmp_path):
    # The map is made at the model's square input size but drawn over the X-ray as it was given:
    # a wide image stays wide; a very large one is brought down to DISPLAY_MAX_SIDE, a tiny one
    # up to DISPLAY_MIN_SIDE.
    images, _, _ = blob_images(1, seed=7)
    wide = np.asarray(Image.fromarray(images[0]).resize((400, 240)))
    big = np.asarray(Image.fromarray(images[1]).resize((1500, 2000)))
    tiny = np.asarray(Image.fromarray(images[1]).resize((20, 10)))
    paths = [_write_png(tmp_path / "in" / f"{name}.png", image)
             for name, image in (("wide", wide), ("big", big), ("tiny", tiny))]
    results = write_overlays(blob_predictor, paths, tmp_path / "out")
    assert [r.error for r in results] == [None, None, None]
    with Image.open(tmp_path / "out" / "wide_gradcam.png") as im:
        assert im.size == (400, 240)
        pixels = np.asarray(im)
    assert pixels.std(axis=(0, 1)).min() > 1  # a picture, not a flat fill
    with Image.open(tmp_path / "out" / "big_gradcam.png") as im:
        assert im.size == (round(1500 * DISPLAY_MAX_SIDE / 2000), DISPLAY_MAX_SIDE)
    with Image.open(tmp_path / "out" / "tiny_gradcam.png") as im:
        assert im.size == (DISPLAY_MIN_SIDE, DISPLAY_MIN_SIDE // 2)


def test_explain_cli_writes_overlays_and_names_bad_files(blob_run, tmp_path, capsys):
    images, _, _ = blob_images(2, seed=6)
    folder = tmp_path / "imgs"
    for i, image in enumerate(images):
        _write_png(folder / f"x{i}.png", image)
    (folder / "notes.txt").write_text("not an image")  # in a folder: skipped, not an error
    bad = tmp_path / "bad.png"
    bad.write_text("<html>not an image</html>")
    out = tmp_path / "out"
    status = main(["explain", str(blob_run), str(folder), str(bad), str(tmp_path / "gone.png"),
                   "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2
    assert sorted(p.name for p in out.iterdir()) == [f"x{i}_gradcam.png" for i in range(4)]
    lines = [line for line in err.splitlines() if line.startswith("pneumoscan explain:")]
    assert any(str(bad) in line and "not an image" in line for line in lines), err
    assert any("gone.png" in line for line in lines), err
    assert "Traceback" not in err

    status = main(["explain", str(blob_run), str(folder / "x0.png"), "--out", str(out),
                   "--device", "cpu"])
    assert status == 0
    assert main(["explain", str(tmp_path), str(bad), "--out", str(out)]) == 2  # not a run


@pytest.mark.parametrize("architecture, size", [("vit_tiny_patch16_224", 224),
                                                ("swin_tiny_patch4_window7_224", 224)])
def test_models_without_a_channels_first_map_are_refused_not_misdrawn(architecture, size,
                                                                       tmp_path, capsys):
    """A ViT's layer gives tokens (N, L, C) and a Swin's a channels-last map (N, H, W, C):
    Grad-CAM crashed on the first and drew noise for the second. Now explain and predict --cam
    refuse in one line, and gradcam_problem says why (serve then answers without a heat map)."""
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.explain import gradcam_problem
    from pneumoscan.model_io import save_model

    model = create_model(architecture, in_chans=1, image_size=size).eval()
    meta = {"architecture": architecture, "image_size": size, "in_chans": 1,
            "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 1.0,
            "class_names": ["NORMAL", "PNEUMONIA"]}
    predictor = Predictor(tmp_path, meta, model, torch.device("cpu"))
    problem = gradcam_problem(predictor)
    assert problem.startswith(f"Grad-CAM is not available for {architecture}"), problem
    images = np.zeros((1, size, size), dtype=np.uint8)
    with pytest.raises(PneumoscanError, match="not one \\(channels, height, width\\) map"):
        gradcam(predictor, images)
    assert _hooks(model) == 0

    save_model(tmp_path / "run", model, meta)
    image = _write_png(tmp_path / "x.png", np.full((size, size), 128, np.uint8))
    assert main(["predict", str(tmp_path / "run"), str(image), "--cam", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cam: Grad-CAM is not available" in err, err


def test_convolutional_models_have_no_gradcam_problem(blob_predictor, tmp_path):
    from pneumoscan.explain import gradcam_problem

    assert gradcam_problem(blob_predictor) == ""
    assert gradcam_problem(_seed_cnn_predictor(tmp_path)) == ""
    resnet = create_model("resnet10t", in_chans=1, image_size=64).eval()
    meta = {"architecture": "resnet10t", "image_size": 64, "in_chans": 1,
            "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 1.0}
    assert gradcam_problem(Predictor(tmp_path, meta, resnet, torch.device("cpu"))) == ""


class _Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = torch.zeros_like(x)
        half = x.shape[-1] // 2
        left[..., :half] = 1.0
        return torch.cat([x * left, x * (1 - left)], dim=1)  # channel 0: left, 1: right


class _SharedEvidenceNet(nn.Module):
    """The left half of the image raises both logits alike; the right half PNEUMONIA's alone."""

    gradcam_layer = "features"

    def __init__(self):
        super().__init__()
        self.features = _Halves()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.features(x).mean((2, 3)).unbind(1)
        return torch.stack([left, left + right], dim=1)


def test_gradcam_shows_the_evidence_for_the_log_odds_not_for_one_logit(tmp_path):
    """P(PNEUMONIA) depends on z1 - z0 only: the left half, which moves both logits alike, is no
    evidence, and must stay dark; Grad-CAM of z1 alone lit it up as much as the right."""
    model = _SharedEvidenceNet().eval()
    meta = {"architecture": "shared", "image_size": SIZE, "in_chans": 1,
            "intensity": {"mean": 0.0, "std": 1.0}, "threshold": 0.5, "temperature": 1.0}
    predictor = Predictor(tmp_path, meta, model, torch.device("cpu"))
    cam = gradcam(predictor, np.full((1, SIZE, SIZE), 200, np.uint8))[0]
    half = SIZE // 2
    assert cam[:, half + 1 :].min() > 0.5  # the right half: the evidence
    assert cam[:, : half - 1].max() < 0.05  # the left half: none


def _resnet_run(tmp_path: Path, size: int) -> Path:
    from pneumoscan.model_io import save_model

    run_dir = tmp_path / f"resnet{size}"
    meta = {"architecture": "resnet10t", "image_size": size, "in_chans": 1,
            "intensity": {"mean": 0.5, "std": 0.25}, "threshold": 0.5, "temperature": 1.0,
            "class_names": ["NORMAL", "PNEUMONIA"]}
    save_model(run_dir, create_model("resnet10t", in_chans=1, image_size=size).eval(), meta)
    return run_dir


def test_the_grid_a_map_is_upsampled_from_is_known(tmp_path):
    """A ResNet's last stage is 1/32 of its input: at 32 px a single cell, whose map is one
    colour whatever the X-ray shows, and at 64 px 2 x 2. Nothing said so: an all-red or
    all-blue picture was presented as a heat map."""
    from pneumoscan.explain import Grid, gradcam_grids, grid_note, grid_warning

    coarse = load_predictor(_resnet_run(tmp_path, 32), "cpu")
    finer = load_predictor(_resnet_run(tmp_path, 64), "cpu")
    assert gradcam_grids(finer) == [Grid("layer4", 2, 2, 64)]
    assert grid_note(finer) == "Grad-CAM on layer4: a 2 x 2 grid at 64 px, upsampled to each image"
    assert grid_warning(finer) == ""
    assert gradcam_grids(coarse) == [Grid("layer4", 1, 1, 32)]
    assert grid_warning(coarse).startswith(
        "Grad-CAM's layer layer4 gives a 1 x 1 grid at 32 px: the maps carry no location")
    assert "--image-size" in grid_warning(coarse)
    assert gradcam_grids(_seed_cnn_predictor(tmp_path)) == [Grid("features.block4", 1, 1, SIZE)]
    # An ensemble names each distinct grid once, and warns of the members that have one cell.
    both = EnsemblePredictor(tmp_path, {**finer.meta, "kind": "ensemble"},
                             [finer, coarse, finer])
    assert grid_note(both) == ("Grad-CAM on layer4: a 2 x 2 grid at 64 px; on layer4: a 1 x 1 "
                               "grid at 32 px, upsampled to each image")
    assert grid_warning(both).startswith("1 of the 3 networks' Grad-CAM layers give a 1 x 1 grid")


@pytest.mark.parametrize("size", [32, 64])
def test_explain_says_the_grid_once_and_warns_of_a_single_cell(size, tmp_path, capsys):
    images, _, _ = blob_images(1, seed=14)
    paths = [str(_write_png(tmp_path / "in" / f"x{i}.png", image))
             for i, image in enumerate(images)]
    run_dir = _resnet_run(tmp_path, size)
    assert main(["explain", str(run_dir), *paths, "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    grid = "1 x 1" if size == 32 else "2 x 2"
    assert lines[0] == f"Grad-CAM on layer4: a {grid} grid at {size} px, upsampled to each image"
    assert sum(line.startswith("Grad-CAM on ") for line in lines) == 1
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    if size == 32:
        assert len(warnings) == 1 and "carry no location" in warnings[0], captured.err
    else:
        assert warnings == [], captured.err


def test_explain_gives_each_files_probability_and_label_as_predict_does(blob_run, tmp_path,
                                                                         capsys):
    """explain wrote overlays without a word of what the model concluded, and a map with no
    evidence for PNEUMONIA (all zeros) as an all-blue overlay that looked like a fault."""
    from pneumoscan.model_io import save_model
    from pneumoscan.predict import predict_files

    images, _, _ = blob_images(2, seed=15)
    paths = [_write_png(tmp_path / "in" / f"x{i}.png", image) for i, image in enumerate(images)]
    out = tmp_path / "out"
    assert main(["explain", str(blob_run), *map(str, paths), "--out", str(out),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = predict_files(load_predictor(blob_run, "cpu"), paths)
    assert {row.label for row in rows} == {"NORMAL", "PNEUMONIA"}  # both labels are shown
    for row in rows:
        own = f"{row.path}  -> {out / (Path(row.path).stem + '_gradcam.png')}"
        said = f"{own}  P(PNEUMONIA) {row.probability:.4f} {row.label}"
        assert said in lines or f"{said}; {NO_EVIDENCE}" in lines, lines

    flat = _flat_predictor(blob_run, load_predictor(blob_run, "cpu").meta)
    save_model(tmp_path / "flat", flat.model, flat.meta)
    assert main(["explain", str(tmp_path / "flat"), str(paths[0]), "--out", str(out),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Every logit 0: P = 0.5, at the threshold of 0.5, and no evidence anywhere on the layer.
    assert lines[1] == (f"{paths[0]}  -> {out / 'x0_gradcam.png'}  P(PNEUMONIA) 0.5000 "
                        f"PNEUMONIA; {NO_EVIDENCE}")
    assert lines[2] == f"1 Grad-CAM overlay(s) -> {out}"


def test_an_out_that_is_a_file_is_one_line_before_any_work(trained_run, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    image = _write_png(tmp_path / "x.png", np.full((32, 32), 128, np.uint8))
    assert main(["explain", str(trained_run), str(image), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0] and "overlay" not in err[0], err
