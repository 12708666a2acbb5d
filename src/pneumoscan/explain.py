"""Grad-CAM heat maps: where in an X-ray the evidence for PNEUMONIA lies, as the model sees it.

The map is computed by captum's ``LayerGradCam`` on the layer each model names as its
``gradcam_layer``, for the log-odds of PNEUMONIA (what the probability depends on). captum
registers its hooks for one call and removes them itself, so a model is left exactly as it was;
the tests check that. Everything else here is the few lines that turn the layer attribution
into a picture: ReLU (as Grad-CAM defines it, on the layer's own grid), upsample to the image
size, scale to [0, 1].

Grad-CAM needs a layer that gives a (channels, height, width) map. Some timm families give
tokens (ViT, DeiT, Mixer) or channels-last maps (Swin): for those ``gradcam_problem`` says why
not, so that ``explain`` and ``predict --cam`` refuse in one line and ``serve`` answers without
a heat map, instead of crashing or drawing a meaningless one.

The map can show no more places than that layer's grid has cells: a ResNet's last stage is 1/32
of the input, a 2 x 2 grid at 64 px and a single cell at 32 px, where every map is one colour.
``gradcam_grids`` tells the grid, ``grid_note`` and ``grid_warning`` say it to the user.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import clip_name

TARGET_CLASS = CLASS_NAMES.index("PNEUMONIA")
BATCH_SIZE = 32  # images per backward pass: bounded memory on a CPU, still batched
DEFAULT_ALPHA = 0.45
COLORMAP = "jet"
# Overlays written to files show the X-ray as it was given (its own aspect ratio), its longest
# side brought within these bounds: the model's input (often 64 px and square) is too small to
# read, a 3,000 px original needlessly large.
DISPLAY_MIN_SIDE, DISPLAY_MAX_SIDE = 256, 1024
SOURCE_KEY = "Source"  # the PNG text chunk naming the file an overlay was drawn for


def gradcam(predictor, images: np.ndarray) -> np.ndarray:
    """Grad-CAM maps for PNEUMONIA: (N, S, S) uint8 images -> (N, S, S) float32 in [0, 1].

    ``predictor`` is a ``Predictor`` or an ``EnsemblePredictor`` (its members' maps averaged with
    ``member_weights``); images are at ``predictor.image_size``. Each map, an ensemble's
    included, is scaled so that its peak is 1; a map with no positive evidence anywhere is all
    zeros. How coarse the map is depends on the layer's grid (``gradcam_grids``).
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    problem = gradcam_problem(predictor)
    if problem:
        raise PneumoscanError(problem)
    members = getattr(predictor, "members", None)
    if members is not None:
        maps = np.stack([gradcam(member, images) for member in members])
        combined = np.tensordot(member_weights(predictor), maps, axes=1)
        # Each member's map peaks at 1, but rarely all at the same place: unscaled, the mean
        # would peak at 0.5-0.8, and a colour would mean less than it does for one model.
        return _scaled_to_peak_one(combined)
    size = images.shape[1:]
    out = [
        _gradcam_batch(predictor, images[start : start + BATCH_SIZE], size)
        for start in range(0, len(images), BATCH_SIZE)
    ]
    if not out:
        return np.zeros((0, *size), dtype=np.float32)
    return np.concatenate(out)


def _gradcam_batch(predictor, images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise PneumoscanError(
            "Grad-CAM needs captum: pip install 'pneumoscan[explain]'"
        ) from None
    from pneumoscan.models import gradcam_module

    model: nn.Module = predictor.model
    was_training = model.training
    model.eval()  # BatchNorm running statistics and no dropout, as at prediction
    try:
        # Prediction runs under torch.no_grad elsewhere; Grad-CAM needs the graph.
        with torch.enable_grad():
            x = predictor.model_input(torch.from_numpy(np.ascontiguousarray(images)))
            x = x.float().contiguous().requires_grad_(True)
            cam = LayerGradCam(_LogOdds(model), gradcam_module(model))
            # (N, 1, h, w) at the layer's size, ReLU'd there: regions of negative evidence
            # must not bleed into their positive neighbours when upsampled.
            attr = cam.attribute(x, target=0, relu_attributions=True)
            attr = LayerAttribution.interpolate(attr.detach(), size, interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    # Non-negative: ReLU'd on the layer's grid, then interpolated.
    return _scaled_to_peak_one(attr[:, 0].float().cpu().numpy())


def _scaled_to_peak_one(maps: np.ndarray) -> np.ndarray:
    """(N, H, W) non-negative maps, each divided by its own peak, so that red is the strongest
    evidence in that image; a map with no evidence anywhere stays all zeros (all blue)."""
    peak = maps.max(axis=(1, 2), initial=0.0)[:, None, None]
    scaled = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 1e-12)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def member_weights(predictor) -> np.ndarray:
    """How much each member's map counts in an ensemble's: equally in a mean of probabilities;
    in a stack, by its coefficient on the members' log-odds. A member weighed negatively says
    the opposite of its own map, which a heat map of evidence for PNEUMONIA cannot show, so it
    is left out (all equal if every coefficient is negative or zero)."""
    n = len(predictor.members)
    stacker = predictor.meta.get("stacker") if predictor.meta.get("kind") == "stack" else None
    weights = np.ones(n)
    if stacker is not None:
        weights = np.clip(np.asarray(stacker["coef"], dtype=np.float64), 0.0, None)
    if weights.sum() <= 0:
        weights = np.ones(n)
    return weights / weights.sum()


class _LogOdds(nn.Module):
    """The model's log-odds of PNEUMONIA, z1 - z0, as one output: the probability depends on
    the difference alone, so evidence both logits share is no evidence for PNEUMONIA."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return (z[:, TARGET_CLASS] - z[:, 1 - TARGET_CLASS])[:, None]


# Said of an all-blue map (no positive evidence anywhere), which would otherwise look broken.
NO_EVIDENCE = "no evidence for PNEUMONIA on this layer"


class Grid(NamedTuple):
    """The grid of one network's Grad-CAM layer: each map is upsampled from it."""

    layer: str
    rows: int
    cols: int
    image_size: int  # the network's input size, which the grid depends on

    def __str__(self) -> str:
        return f"on {self.layer}: a {self.rows} x {self.cols} grid at {self.image_size} px"


class _Probe(NamedTuple):
    problem: str  # why Grad-CAM cannot explain the network; "" when it can
    grid: Grid | None  # None where there is a problem


def gradcam_problem(predictor) -> str:
    """Why Grad-CAM cannot explain this predictor's model ("" when it can).

    Found once per model by one forward pass of a blank image with a hook on the Grad-CAM
    layer: its output must be (N, C, h, w) with a square grid, as square inputs give.
    """
    members = getattr(predictor, "members", None)
    if members is not None:
        return next((p for p in map(gradcam_problem, members) if p), "")
    return _probe(predictor).problem


def gradcam_grids(predictor) -> list[Grid]:
    """The Grad-CAM grid of each network in ``predictor`` (its own, or one per member) that
    Grad-CAM can explain."""
    members = getattr(predictor, "members", None)
    if members is not None:
        return [grid for member in members for grid in gradcam_grids(member)]
    grid = _probe(predictor).grid
    return [] if grid is None else [grid]


def grid_note(predictor) -> str:
    """One line saying where the maps come from, e.g. ``Grad-CAM on layer4: a 2 x 2 grid at
    64 px, upsampled to each image``; an ensemble's distinct grids are joined by ``; ``."""
    described = dict.fromkeys(str(grid) for grid in gradcam_grids(predictor))
    return f"Grad-CAM {'; '.join(described)}, upsampled to each image"


def grid_warning(predictor) -> str:
    """Why the maps show no place ("" when they can): a 1 x 1 grid is one number per image, so
    its map is one colour, all red or all blue, whatever the X-ray shows."""
    grids = gradcam_grids(predictor)
    single = [grid for grid in grids if (grid.rows, grid.cols) == (1, 1)]
    if not single:
        return ""
    advice = "train at a larger --image-size for maps that show where the evidence lies"
    if len(single) == len(grids):
        return (f"Grad-CAM's layer {single[0].layer} gives a 1 x 1 grid at "
                f"{single[0].image_size} px: the maps carry no location (each is one colour, "
                f"all red or all blue); {advice}")
    return (f"{len(single)} of the {len(grids)} networks' Grad-CAM layers give a 1 x 1 grid: "
            f"their part of each map is the same everywhere and carries no location; {advice}")


def _probe(predictor) -> _Probe:
    """``_probe_gradcam_layer``, once per model and input size."""
    model: nn.Module = predictor.model
    cache = getattr(model, "_pneumoscan_gradcam_probes", None)
    if cache is None:
        cache = model._pneumoscan_gradcam_probes = {}
    size = predictor.image_size
    if size not in cache:
        cache[size] = _probe_gradcam_layer(predictor)
    return cache[size]


def _probe_gradcam_layer(predictor) -> _Probe:
    from pneumoscan.models import gradcam_module

    model: nn.Module = predictor.model
    name = getattr(predictor, "name", type(model).__name__)
    try:
        layer = gradcam_module(model)
    except (AttributeError, KeyError) as e:
        return _Probe(f"Grad-CAM is not available for {name}: no layer {e} to look at", None)
    seen: list = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    was_training = model.training
    model.eval()
    try:
        size = predictor.image_size
        with torch.no_grad():
            model(predictor.model_input(torch.zeros((1, size, size), dtype=torch.uint8)).float())
    finally:
        hook.remove()
        model.train(was_training)
    out = seen[0] if seen else None
    if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] == out.shape[3] and (
            out.shape[1] != out.shape[2]):
        rows, cols = out.shape[2:]
        return _Probe("", Grid(str(model.gradcam_layer), int(rows), int(cols), size))
    if isinstance(out, torch.Tensor):  # a ViT's tokens, a Swin's channels-last map
        what = f"{tuple(out.shape)} (token or channels-last models)"
    else:  # a list of maps (HRNet's branches), or nothing seen at all
        what = f"a {type(out).__name__}"
    return _Probe(f"Grad-CAM is not available for {name}: its layer {model.gradcam_layer} gives "
                  f"{what}, not one (channels, height, width) map", None)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """A uint8 grey image (H, W) with a heat map blended over it: uint8 RGB (H, W, 3).

    ``cam`` holds values in [0, 1] (any shape: it is resized to the image); ``alpha`` is the
    weight of the colour map.
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D grey image (H, W), got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (H, W), got shape {cam.shape}")
    if cam.shape != image.shape:
        cam = _resize(cam, image.shape)
    heat = colormaps[COLORMAP](cam)[..., :3]  # float RGB in [0, 1]
    gray = np.repeat(image.astype(np.float32)[..., None] / 255.0, 3, axis=2)
    blended = (1.0 - alpha) * gray + alpha * heat
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def _resize(cam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(cam))[None, None]
    t = torch.nn.functional.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)
    return t[0, 0].clamp(0.0, 1.0).numpy()


def overlay_png(image: np.ndarray, cam: np.ndarray, source: str | None = None) -> bytes:
    """PNG bytes of ``overlay(image, cam)``; ``source`` (``overlay_source``) is kept in it as
    the text chunk ``Source``, naming the file it was drawn for."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = None
    if source is not None:
        info = PngInfo()
        info.add_text(SOURCE_KEY, source)  # international text when not Latin-1
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, cam), mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def overlay_source(path: str | Path) -> str:
    """The input an overlay file names: its absolute path (a name's bytes that are not UTF-8
    shown as escapes)."""
    return os.fsencode(os.path.abspath(path)).decode("utf-8", "backslashreplace")


def drawn_for(file: Path) -> str | None:
    """The ``Source`` of an overlay file; None for any other file (a user's, an older one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            return im.info.get(SOURCE_KEY) if im.format == "PNG" else None
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def display_image(path: str | Path) -> np.ndarray:
    """The file's grey image in its own aspect ratio, its longest side scaled into
    [DISPLAY_MIN_SIDE, DISPLAY_MAX_SIDE] when it lies outside."""
    from PIL import Image

    from pneumoscan.data.decode import read_gray

    image = read_gray(path)
    height, width = image.shape
    longest = max(height, width)
    scale = min(max(longest, DISPLAY_MIN_SIDE), DISPLAY_MAX_SIDE) / longest
    if scale == 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


class OverlayNames:
    """Names for the overlays written into one folder: ``<stem>_gradcam.png``, numbered
    (``<stem>-2_gradcam.png``, ...) so that none is overwritten, neither one written by this
    writer (across its calls) nor a file already in the folder, other than this input's own
    overlay from an earlier call, which is brought up to date wherever its number is.

    The stem is the whole file name when its extension is not an image's: DICOMs are often
    named by their instance UID (``1.2.826.0.1.3680043.8.498.101``), whose last part is what
    tells one from the next. A stem too long for a file name once the suffix is added (names
    take 255 bytes) is cut. The folder is listed once, and each overlay in it opened at most
    once, so a thousand inputs of one name cost a thousand reads, not a million.
    """

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.taken: set[str] = set()  # written by this writer
        self._on_disk: dict[str, list[str]] | None = None  # stem -> overlay names there
        self._sources: dict[str, str | None] = {}  # overlay name -> the input it names

    def name_for(self, path: str | Path) -> str:
        from pneumoscan.data.decode import IMAGE_SUFFIXES

        path = Path(path)
        stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name
        stem = clip_name(stem, 230) or "image"
        source = overlay_source(path)
        own = next((name for name in sorted(self._listed(stem), key=_number_after(stem))
                    if name not in self.taken and self._source(name) == source), None)
        name, n = own or f"{stem}_gradcam.png", 1
        while own is None and (name in self.taken or self._exists(name)):
            n += 1
            name = f"{stem}-{n}_gradcam.png"
        self.taken.add(name)
        return name

    def _exists(self, name: str) -> bool:
        return self.out_dir is not None and os.path.lexists(self.out_dir / name)

    def _listed(self, stem: str) -> list[str]:
        if self._on_disk is None:
            self._on_disk = {}
            if self.out_dir is not None and self.out_dir.is_dir():
                for entry in sorted(os.listdir(self.out_dir)):
                    base = entry.removesuffix("_gradcam.png")
                    if base == entry:
                        continue
                    # x-2_gradcam.png is x's second overlay, or the overlay of an input x-2.
                    numbered = re.fullmatch(r"(.+)-[0-9]+", base, re.DOTALL)
                    for key in {base, numbered.group(1) if numbered else base}:
                        self._on_disk.setdefault(key, []).append(entry)
        return self._on_disk.get(stem, [])

    def _source(self, name: str) -> str | None:
        if name not in self._sources:
            self._sources[name] = drawn_for(self.out_dir / name)
        return self._sources[name]


def _number_after(stem: str):
    """Sort key of ``stem``'s overlay names by their number (``<stem>_gradcam.png`` is 1)."""
    def number(name: str) -> int:
        digits = name[len(stem) + 1 : -len("_gradcam.png")]
        return int(digits) if digits else 1
    return number


class Overlay(NamedTuple):
    path: str  # the input file, as given
    file: Path | None  # the overlay written for it; None when it could not be read
    error: str | None  # why it could not be read; None when the overlay was written
    # The map is all zeros: no evidence for PNEUMONIA on the layer, an all-blue overlay that
    # would otherwise look like a rendering fault.
    blank: bool = False


class OverlaysByBatch:
    """Grad-CAM overlays written a prediction batch at a time (``write`` is ``iter_predictions``'
    ``on_batch``), so that each row it yields can name its own (``take``)."""

    def __init__(self, predictor, out_dir: str | Path):
        self.predictor, self.out_dir = predictor, Path(out_dir)
        self.names = OverlayNames(self.out_dir)  # unique across batches, as in one call
        self._done: dict[str, Overlay] = {}
        self.written = 0

    def write(self, paths: Sequence[str | Path]) -> None:
        for overlay in write_overlays(self.predictor, paths, self.out_dir, names=self.names):
            self._done[overlay.path] = overlay
            self.written += overlay.file is not None

    def take(self, path: str) -> Overlay | None:
        """The overlay of a file of the last batch; None when none was attempted (unreadable)."""
        return self._done.pop(path, None)


def write_overlays(
    predictor, paths: Sequence[str | Path], out_dir: str | Path, *,
    names: OverlayNames | None = None,
) -> list[Overlay]:
    """Write ``OUT/<stem>_gradcam.png`` (``OverlayNames``) for each readable file; an
    ``Overlay`` for each.

    Files are decoded with ``read_gray`` at the predictor's size and explained a batch at a time,
    so memory stays bounded however many paths are given; each map is then drawn over the file
    decoded again as it was given (``display_image``), stretched back from the model's square
    input. An unreadable file costs only itself. ``names``: the ``OverlayNames`` of earlier
    calls into OUT, so that a caller writing batch by batch keeps the names unique.
    """
    from pneumoscan.data.decode import read_gray
    from pneumoscan.errors import UnreadableImage
    from pneumoscan.fileio import atomic_write_bytes

    out_dir = Path(out_dir)
    results: list[Overlay] = []
    names = OverlayNames(out_dir) if names is None else names
    paths = [str(p) for p in paths]
    for start in range(0, len(paths), BATCH_SIZE):
        chunk_paths, chunk_images = [], []
        for path in paths[start : start + BATCH_SIZE]:
            try:
                chunk_images.append(read_gray(path, predictor.image_size))
                chunk_paths.append(path)
            except UnreadableImage as e:
                results.append(Overlay(path, None, e.reason))
        if not chunk_images:
            continue
        images = np.stack(chunk_images)
        maps = gradcam(predictor, images)
        for path, cam in zip(chunk_paths, maps, strict=True):
            try:
                image = display_image(path)
            except UnreadableImage as e:  # changed or removed since it was first read
                results.append(Overlay(path, None, e.reason))
                continue
            file = out_dir / names.name_for(path)
            try:
                atomic_write_bytes(file, overlay_png(image, cam, overlay_source(path)))
            except OSError as e:  # a full disk: this overlay is lost, not the files' predictions
                results.append(Overlay(path, None, f"cannot write {file} "
                                                   f"({(e.strerror or str(e)).lower()})"))
                continue
            results.append(Overlay(path, file, None, blank=not cam.any()))
    order = {p: i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])  # the caller's order, errors and all
    return results
