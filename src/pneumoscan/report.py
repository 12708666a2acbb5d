"""One self-contained HTML report of a run: ``RUN/report.html``.

Everything is inside the one file: figures are PNGs embedded as base64 data URIs, the style is
inline, and there are no scripts, fonts or other resources from anywhere, so the report can be
mailed, archived or opened offline and shows the same thing. Each piece a run lacks (an
ensemble has no learning curves of its own, data may have moved, files may be gone) is replaced
by a note saying so; a report is never lost to one missing piece.
"""

from __future__ import annotations

import base64
import html
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import CLASS_NAMES, __version__
from pneumoscan.console import printable
from pneumoscan.data import medmnist
from pneumoscan.evaluate import RATE_KEYS, format_figure
from pneumoscan.fileio import atomic_write_text, read_json
from pneumoscan.model_io import read_meta
from pneumoscan.run_folder import TEST_METRICS
from pneumoscan.run_plots import (
    PLOTS_DIR,
    SPLIT_TITLES,
    SPLITS,
    expected_plots,
    load_split_predictions,
    write_evaluation_plots,
)
from pneumoscan.threshold_rules import format_threshold

REPORT = "report.html"
GALLERY_PER_CELL = 4  # images per confusion cell in the Grad-CAM gallery
DISCLAIMER = "Research use only, not a medical device."
SECTIONS = {
    "data": "Data",
    "config": "Configuration",
    "learning": "Learning curves",
    "figures": "Figures with 95% intervals",
    "plots": "Plots",
    "gradcam": "Grad-CAM gallery",
}
# file stem in plots/ -> what the figure shows
PLOT_TITLES = {
    "roc": "ROC curve",
    "pr": "Precision-recall curve",
    "confusion": "Confusion matrix (counts and share of the actual class)",
    "reliability": "Reliability",
    "histogram": "Scores by actual class",
}
# confusion cell -> (actual label, predicted positive?, most confident first: sort descending?)
CELLS = {
    "true positives": (1, True, True),
    "false positives": (0, True, True),
    "false negatives": (1, False, False),
    "true negatives": (0, False, False),
}


@dataclass
class Section:
    id: str
    body: list[str] = field(default_factory=list)

    def add(self, *parts: str) -> Section:
        self.body.extend(parts)
        return self

    def note(self, text: str) -> Section:
        return self.add(f'<p class="note">{esc(text)}</p>')


def esc(value: Any) -> str:
    # printable: a file name's undecodable bytes as \xNN, which UTF-8 can carry.
    return html.escape(printable(str(value)), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes, alt: str, css: str = "") -> str:
    klass = f' class="{css}"' if css else ""
    return f'<img{klass} src="{data_uri(png)}" alt="{esc(alt)}">'


def figure(png: bytes, caption: str, css: str = "") -> str:
    return f"<figure>{img_tag(png, caption, css)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], css: str = "") -> str:
    klass = f' class="{css}"' if css else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _warn(what: str, e: BaseException) -> str:
    reason = f"{type(e).__name__}: {e}".splitlines()[0]
    print(f"pneumoscan report: warning: {what}: {reason}", file=sys.stderr)
    return f"{what}: {reason}"


# --------------------------------------------------------------------------- inputs


# What the report shows of each member of a stack: enough to tell the model families apart.
MEMBER_SETTINGS = ("model", "recipe", "image_size", "epochs", "batch_size", "seed")


def read_config(run_dir: Path, meta: dict) -> dict | None:
    """The run's resolved config.json. A stack's own has no ``data`` field: its members' data
    (the same images for all, as ``stack`` checks) and each member's main settings are added."""
    config = _read_json_or_none(run_dir / "config.json")
    if config is not None and "data" not in config and meta.get("members"):
        members = {name: _read_json_or_none(run_dir / name / "config.json")
                   for name in meta["members"]}
        readable = {name: m for name, m in members.items() if isinstance(m, dict)}
        if readable:
            first = next(iter(readable.values()))
            config = {**config, "data": first.get("data"), "member_settings": {
                name: {**{k: m.get(k) for k in MEMBER_SETTINGS},
                       "folds": (m.get("cv") or {}).get("folds")}
                for name, m in readable.items()
            }}
    return config


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError) as e:
        _warn(f"{path} is unreadable", e)
        return None


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys, in their own order."""
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


# --------------------------------------------------------------------------- sections


def data_section(run_dir: Path, meta: dict, config: dict | None) -> Section:
    section = Section("data")
    eda_dir = run_dir / "eda"
    if eda_dir.is_dir():
        return _data_from_eda(section, eda_dir)
    fold = ((config or {}).get("cv") or {}).get("fold")
    if fold is not None:
        # Its splits are not the data's: it trained on its training folds less the validation
        # carved from them, and was tested on its held-out fold (the cv run's figures).
        section.note(f"Fold {fold} of a cross-validation run (the folder above): trained on its "
                     "training folds, with validation carved by patient from them; its held-out "
                     "fold is scored in the cross-validation run's out-of-fold figures. The "
                     "counts below are those of its saved predictions.")
        return _data_from_predictions(section, run_dir)
    # The run's own record of its data, resolved when it trained: a relative --data would
    # otherwise be read from wherever the report is made.
    source = meta.get("data_source")
    folder = isinstance(source, str) and medmnist.spec_of(source) is None
    spec = source if folder else (config or {}).get("data")
    if not spec:
        section.note("The run does not record its data source; the counts below are those of "
                     "the saved predictions.")
        return _data_from_predictions(section, run_dir)
    try:
        data = _load_source(str(spec), meta, config or {})
    except Exception as e:  # moved, deleted or offline data: say so and go on
        section.note(_warn(f"the data at {spec} is not reachable now", e)
                     + ". The counts below are those of the saved predictions.")
        return _data_from_predictions(section, run_dir)
    try:
        return _data_from_source(section, data, str(spec), meta)
    except Exception as e:  # a figure that cannot be drawn (a full temporary disk)
        return section.note(_warn("the data's figures could not be drawn", e))


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    rows = []
    for split, by_class in counts.items():
        total = sum(by_class.values())
        share = by_class.get(CLASS_NAMES[1], 0) / total if total else 0.0
        rows.append([split, *(by_class.get(c, 0) for c in CLASS_NAMES), total, f"{share:.1%}"])
    return table(["split", *CLASS_NAMES, "total", f"share {CLASS_NAMES[1]}"], rows, "numbers")


def _data_from_eda(section: Section, eda_dir: Path) -> Section:
    section.note(f"From the data summary saved in {eda_dir}.")
    summary = _read_json_or_none(eda_dir / "eda.json")
    if summary:
        section.add(f"<p>Source: <code>{esc(summary.get('source', '?'))}</code></p>")
        counts = {
            split: {c: int(s.get("n", 0)) for c, s in entry.get("classes", {}).items()}
            for split, entry in summary.get("splits", {}).items()
        }
        section.add(_counts_table(counts))
        for note in summary.get("notes", []):
            section.note(note)
    for name, caption in (("class_balance.png", "Class balance per split"),
                          ("sample_grid.png", "Sample images per class (training split)")):
        if (eda_dir / name).is_file():
            section.add(figure((eda_dir / name).read_bytes(), caption))
    return section


def _load_source(spec: str, meta: dict, config: dict):
    """The run's data as it trained on it: its size, validation fraction and seed."""
    from pneumoscan.data.dataset import load_data

    image_size = int(config.get("image_size") or meta["image_size"])
    return load_data(
        spec, image_size, val_fraction=float(config.get("val_fraction", 0.1)),
        seed=int(config.get("seed", 0)), progress=False,
        validation="carve" if meta.get("kind", "single") == "single" else "pool",
    )


def _data_from_source(section: Section, data, spec: str, meta: dict) -> Section:
    from pneumoscan import plots
    from pneumoscan.data.dataset import data_changed

    section.add(f"<p>Source: <code>{esc(data.source)}</code></p>")
    if (Path(spec) / "SYNTHETIC.txt").is_file():
        section.add(f'<p class="warning">{esc((Path(spec) / "SYNTHETIC.txt").read_text().strip())}'
                    "</p>")
    counts = {name: split.class_counts() for name, split in data.splits().items() if len(split)}
    section.add(_counts_table(counts))
    for note in data.notes:
        section.note(note)
    if data_changed(meta.get("data_fingerprint"), data.fingerprint):
        section.add('<p class="warning">These images are not the ones the model was trained on: '
                    "files were added, removed or changed since. The figures further down come "
                    "from the predictions saved at training time.</p>")
    if meta.get("kind", "single") != "single":
        section.note("Cross-validated: every training image was held out once, and the "
                     "figures below come from the predictions made while it was held out.")
    if data.skipped:
        section.note(f"{len(data.skipped)} unreadable file(s) were skipped.")
    rng = np.random.default_rng(0)
    samples = {}
    for label, cls in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(data.train.labels == label)
        pick = rng.choice(idx, size=min(5, len(idx)), replace=False)
        samples[cls] = [data.train.images[i] for i in sorted(pick)]
    with tempfile.TemporaryDirectory() as tmp:
        balance = plots.class_balance(counts, Path(tmp) / "balance.png").read_bytes()
        grid = plots.sample_grid(samples, Path(tmp) / "grid.png").read_bytes()
    section.add(figure(balance, "Class balance per split"),
                figure(grid, "Sample images per class (training split)"))
    return section


def _data_from_predictions(section: Section, run_dir: Path) -> Section:
    counts = {}
    for split in SPLITS:
        pred = load_split_predictions(run_dir, split)
        if pred is not None:
            counts[split] = {c: int(np.sum(pred.labels == i)) for i, c in enumerate(CLASS_NAMES)}
    if counts:
        section.add(_counts_table(counts))
    else:
        section.note("No saved predictions either: no counts to show.")
    return section


def config_section(config: dict | None) -> Section:
    section = Section("config")
    if config is None:
        return section.note("This run has no config.json.")
    rows = [(k, "" if v is None else v) for k, v in flatten(config)]
    return section.add(table(["setting", "value"], rows, "config"))


def describe_epochs(meta: dict) -> str:
    trained = int(meta["epochs_trained"])
    text = f"{trained} epoch{'s' if trained != 1 else ''} trained"
    kept = meta.get("weights_from_epoch")
    if kept and kept != trained:
        text += f"; the model holds the weights of epoch {kept}, the lowest validation loss"
    return text + "."


def learning_section(run_dir: Path, meta: dict) -> Section:
    section = Section("learning")
    path = run_dir / PLOTS_DIR / "learning_curves.png"
    if path.is_file():
        section.add(figure(path.read_bytes(), "Loss and accuracy per epoch"))
        if "epochs_trained" in meta:
            section.note(describe_epochs(meta))
    elif meta.get("kind") != "single":
        kind = str(meta.get("kind"))
        article = "An" if kind[:1] and kind[0] in "aeiou" else "A"
        section.note(f"{article} {kind} run has no learning curves of its own; each member "
                     "run has its own in its plots/ folder.")
    else:
        section.note("This run has no metrics.jsonl: no learning curves to show.")
    return section


def _with_ci(metrics: dict | None, key: str) -> tuple[str, str]:
    if not metrics:
        return "", ""
    ci = (metrics.get("ci95") or {}).get(key)
    ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
    return format_figure(metrics.get(key)), ci_text


THRESHOLD_CHOSEN_ON = {
    "single": "validation data",
    "ensemble": "the out-of-fold predictions (each image scored by the fold model that did not "
                "train on it)",
    "stack": "the stack's nested out-of-fold predictions (each image scored by a combiner fitted "
             "without it)",
}


def figures_section(run_dir: Path, meta: dict) -> Section:
    section = Section("figures")
    kind = meta.get("kind", "single")
    # An ensemble's or a stack's "validation" figures are its out-of-fold ones.
    selection = "validation" if kind == "single" else "out-of-fold"
    columns = {selection: meta.get("validation"),
               "test": _read_json_or_none(run_dir / TEST_METRICS)}
    columns = {k: v for k, v in columns.items() if isinstance(v, dict)}
    if not columns:
        return section.note("No validation or test figures were saved with this run.")
    header = ["figure"]
    for name in columns:
        header += [name, "95% interval"]
    rows = []
    for key in RATE_KEYS:
        row = [key.replace("_", " ")]
        for metrics in columns.values():
            row += _with_ci(metrics, key)
        rows.append(row)
    for key in ("loss", "brier", "ece", "threshold", "n"):
        rows.append([key, *(x for m in columns.values() for x in (format_figure(m.get(key)), ""))])
    for cell in ("tp", "fp", "tn", "fn"):
        counts = [format_figure((m.get("confusion") or {}).get(cell)) for m in columns.values()]
        rows.append([f"confusion {cell}", *(x for count in counts for x in (count, ""))])
    rows += _by_kind_rows(columns)
    section.add(table(header, rows, "numbers"))
    rule = meta.get("threshold_rule", "")
    section.note(
        f"Positive class {CLASS_NAMES[1]}. Threshold {format_threshold(meta['threshold'])}"
        + (f" ({rule})" if rule else "")
        + f", chosen on {THRESHOLD_CHOSEN_ON.get(kind, 'validation data')}; the test split "
        "was never used to select anything. "
        "Intervals: 95%, a bootstrap over patients; for a share that is all right or all "
        "wrong, Clopper-Pearson's exact interval over its patients."
    )
    if any(m.get("sensitivity_by_kind") for m in columns.values()):
        section.note("Sensitivity by kind of pneumonia: within the PNEUMONIA images whose "
                     "Kermany file names say bacterial or viral (their number in brackets).")
    if "test" not in columns:
        section.note("This run has no test split figures (test_metrics.json).")
    return section


def _by_kind_rows(columns: dict[str, dict]) -> list[list[str]]:
    """A row for each kind of pneumonia any column has: its sensitivity, interval and count."""
    kinds = sorted({k for m in columns.values() for k in (m.get("sensitivity_by_kind") or {})})
    rows = []
    for kind in kinds:
        row = [f"sensitivity, {kind}"]
        for metrics in columns.values():
            figures = (metrics.get("sensitivity_by_kind") or {}).get(kind)
            if not figures:
                row += ["", ""]
                continue
            ci = figures.get("ci95")
            row += [f"{format_figure(figures.get('sensitivity'))} ({figures.get('n')})",
                    f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""]
        rows.append(row)
    return rows


def split_title(split: str, meta: dict) -> str:
    """What a split's saved predictions are: an ensemble's or a stack's "val" predictions are
    its out-of-fold ones, each image scored by a model that did not train on it."""
    if split == "val" and meta.get("kind", "single") != "single":
        return "out-of-fold"
    return SPLIT_TITLES[split]


def plots_section(run_dir: Path, meta: dict, notes: list[str]) -> Section:
    section = Section("plots")
    for note in notes:
        section.note(note)
    shown = False
    for split in SPLITS:
        figures = []
        for stem, title in PLOT_TITLES.items():
            path = run_dir / PLOTS_DIR / f"{stem}_{split}.png"
            if path.is_file():
                figures.append(figure(path.read_bytes(), f"{title}, {split_title(split, meta)}"))
        if figures:
            shown = True
            section.add(f"<h3>{esc(split_title(split, meta).capitalize())}</h3>",
                        '<div class="grid">', *figures, "</div>")
            if not (run_dir / PLOTS_DIR / f"roc_{split}.png").is_file():
                section.note(f"No ROC or PR curve for {split_title(split, meta)}: "
                             "it holds only one class.")
    if not shown:
        section.note("This run has no saved predictions to plot.")
    return section


def gallery_picks(
    labels: np.ndarray, prob: np.ndarray, threshold: float, per_cell: int = GALLERY_PER_CELL
) -> dict[str, list[int]]:
    """Indices for each confusion cell, most confident first (the clearest examples and the
    most confident mistakes)."""
    labels, prob = np.asarray(labels), np.asarray(prob)
    positive = prob >= threshold
    picks = {}
    for cell, (actual, predicted_positive, descending) in CELLS.items():
        idx = np.flatnonzero((labels == actual) & (positive == predicted_positive))
        order = np.argsort(-prob[idx] if descending else prob[idx], kind="stable")
        picks[cell] = idx[order][:per_cell].tolist()
    return picks


def gradcam_section(run_dir: Path, meta: dict, device: str) -> Section:
    section = Section("gradcam")
    split, pred = None, None
    for split in ("test", "val"):  # test when there is one: validation chose the threshold
        pred = load_split_predictions(run_dir, split)
        if pred is not None:
            break
    if pred is None or not pred.paths:
        return section.note("No saved predictions with file paths: no gallery to show.")
    try:
        from pneumoscan.device import resolve_device
        from pneumoscan.explain import grid_note, grid_warning
        from pneumoscan.model_io import load_predictor

        predictor = load_predictor(run_dir, resolve_device(device))
        cards = _gallery_cards(predictor, meta, pred)
        grid, coarse = grid_note(predictor), grid_warning(predictor)
    except Exception as e:  # captum missing, weights gone, ...: the rest of the report stands
        return section.note(_warn("the Grad-CAM gallery could not be made", e))
    if cards is None:
        return section.note(f"The {split_title(split, meta)} images are no longer at the "
                            "paths saved with the run: no gallery to show.")
    what = split_title(split, meta)
    section.add(f"<p>{esc(what.capitalize())} {'predictions' if what == 'out-of-fold' else 'split'}"
                ", threshold "
                f"{format_threshold(meta['threshold'])}. Each pair shows the image and where the "
                f"evidence for {CLASS_NAMES[1]} lies (red = strongest; each map is scaled to "
                f"its own peak, so it shows where, not how much). Up to {GALLERY_PER_CELL} of "
                f"each kind, most confident first. {esc(grid)}.</p>")
    if coarse:
        section.note(f"Warning: {coarse}.")
    for cell, items in cards.items():
        section.add(f"<h3>{esc(cell.capitalize())}</h3>")
        if items:
            section.add('<div class="gallery">', *items, "</div>")
        else:
            section.note(f"No {cell} in this split.")
    return section


def _gallery_cards(predictor, meta: dict, pred) -> dict[str, list[str]] | None:
    from pneumoscan.data.decode import read_gray
    from pneumoscan.errors import UnreadableImage
    from pneumoscan.explain import NO_EVIDENCE, gradcam, overlay_png

    picks = gallery_picks(pred.labels, pred.prob, float(meta["threshold"]))
    chosen, images = [], []
    for cell, indices in picks.items():
        for i in indices:
            try:
                images.append(read_gray(pred.paths[i], predictor.image_size))
                chosen.append((cell, i))
            except UnreadableImage:
                continue  # moved or deleted since training: the others still show
    if not images:
        return None if any(picks.values()) else {cell: [] for cell in picks}
    maps = gradcam(predictor, np.stack(images))
    cards: dict[str, list[str]] = {cell: [] for cell in picks}
    for (cell, i), image, cam in zip(chosen, images, maps, strict=True):
        path = pred.paths[i]
        label = CLASS_NAMES[int(pred.labels[i])]
        caption = (f'<figcaption><span class="path" title="{esc(path)}">{esc(Path(path).name)}'
                   f"</span><br>P({CLASS_NAMES[1]}) = {pred.prob[i]:.3f} &middot; actual "
                   f"{esc(label)}"
                   + ("" if cam.any() else f"<br>{esc(NO_EVIDENCE)}")
                   + "</figcaption>")
        cards[cell].append(
            '<figure class="card"><div class="pair">'
            + img_tag(_png(image), f"{path}", "xray")
            + img_tag(overlay_png(image, cam), f"Grad-CAM of {path}", "xray")
            + "</div>" + caption + "</figure>"
        )
    return cards


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- page


CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0; color: #1d232a; background: #f6f7f9; line-height: 1.45; }
header { background: #1f3a5f; color: #fff; padding: 1.2rem 2rem; }
header h1 { margin: 0 0 .3rem; font-size: 1.6rem; }
header p { margin: .2rem 0; }
.disclaimer { display: inline-block; background: #ffd166; color: #3d2c00; font-weight: 600;
              padding: .25rem .6rem; border-radius: 4px; }
nav { background: #fff; border-bottom: 1px solid #dde1e6; padding: .5rem 2rem;
      position: sticky; top: 0; z-index: 1; }
nav a { margin-right: 1.1rem; color: #1f3a5f; text-decoration: none; font-weight: 600; }
main { max-width: 1280px; margin: 0 auto; padding: 1rem 2rem 3rem; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px;
          padding: 1rem 1.4rem; margin: 1.2rem 0; }
h2 { margin-top: .2rem; color: #1f3a5f; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #dde1e6; padding: .25rem .6rem; text-align: left; }
thead th { background: #eef1f5; }
table.numbers td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
table.config td:last-child { font-family: ui-monospace, Menlo, Consolas, monospace; }
.note { color: #5a6572; font-style: italic; }
.warning { color: #8a1c1c; font-weight: 600; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #dde1e6; }
figcaption { font-size: .85rem; color: #3b4652; max-width: 480px; }
.grid figure { width: 360px; }
.grid figure img { width: 360px; }
.gallery { display: flex; flex-wrap: wrap; gap: .6rem; }
.card { background: #fafbfc; border: 1px solid #dde1e6; border-radius: 4px; padding: .4rem;
        margin: 0; width: 260px; }
.pair { display: flex; gap: 4px; }
img.xray { width: 128px; height: 128px; image-rendering: auto; }
.path { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .78rem;
        word-break: break-all; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
footer { color: #5a6572; font-size: .8rem; text-align: center; padding-bottom: 2rem; }
"""


def _header(run_dir: Path, meta: dict) -> str:
    kind = meta.get("kind", "single")
    model = meta.get("architecture", "") if kind == "single" else (
        f"{kind} of {len(meta.get('members', []))} runs")
    facts = [
        ("run", str(run_dir.resolve())),
        ("model", model),
        ("image size", f"{meta['image_size']} px"),
        ("decision threshold", f"{format_threshold(meta['threshold'])}"
         + (f" ({meta['threshold_rule']})" if meta.get("threshold_rule") else "")),
        ("temperature", f"{float(meta['temperature']):.3f}"),
    ]
    if meta.get("data_fingerprint"):
        facts.append(("data fingerprint", meta["data_fingerprint"]))
    rows = "".join(f"<p><strong>{esc(k)}:</strong> {esc(v)}</p>" for k, v in facts)
    return (f"<header><h1>pneumoscan report: {esc(run_dir.resolve().name)}</h1>"
            f'<p class="disclaimer">{esc(DISCLAIMER)}</p>{rows}</header>')


def render(run_dir: Path, meta: dict, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{s.id}">{esc(SECTIONS[s.id])}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(SECTIONS[s.id])}</h2>{"".join(s.body)}</section>'
        for s in sections
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>pneumoscan report: {esc(run_dir.resolve().name)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"{_header(run_dir, meta)}<nav>{nav}</nav><main>{body}</main>"
        f"<footer>pneumoscan {esc(__version__)}, {esc(stamp)}. {esc(DISCLAIMER)}</footer>"
        "</body></html>\n"
    )


def build_report(run_dir: str | Path, *, device: str = "cpu") -> Path:
    """Write ``RUN/report.html`` atomically (drawing any missing plots first); returns its path."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    config = read_config(run_dir, meta)
    plot_notes: list[str] = []
    if any(not p.is_file() for p in expected_plots(run_dir)):
        try:
            write_evaluation_plots(run_dir)
        except Exception as e:
            plot_notes.append(_warn("the plots could not be drawn", e))
    sections = [
        data_section(run_dir, meta, config),
        config_section(config),
        learning_section(run_dir, meta),
        figures_section(run_dir, meta),
        plots_section(run_dir, meta, plot_notes),
        gradcam_section(run_dir, meta, device),
    ]
    return atomic_write_text(run_dir / REPORT, render(run_dir, meta, sections))
