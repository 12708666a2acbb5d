"""A small synthetic chest-X-ray-like data set, so the whole path can be tried in a minute.

It is labelled SYNTHETIC wherever it shows: the images are drawn, not X-rays. 'Pneumonia'
images get bright diffuse patches inside the lung fields, which a model can learn quickly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SYNTHETIC_NOTE = "SYNTHETIC demo data: drawn images, not X-rays; figures mean nothing clinically"


def synthetic_xray(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """One uint8 (size, size) image: two dark lung fields in a brighter chest, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 0.55 + 0.1 * rng.standard_normal() - 0.25 * ((xx - 0.5) ** 2 + (yy - 0.6) ** 2)
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        image = np.where(lung, image - 0.35, image)
    if pneumonia:
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.choice([0.32, 0.68]) + rng.normal(0, 0.04), rng.uniform(0.35, 0.7)
            r = rng.uniform(0.06, 0.12)
            image += 0.35 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    image += 0.05 * rng.standard_normal((size, size))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_synthetic_dataset(
    root: Path, *, n_train: int = 120, n_test: int = 40, size: int = 64, seed: int = 0
) -> Path:
    """Write train/ and test/ folders of NORMAL and PNEUMONIA PNGs; returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            pneumonia = i % 3 != 0  # about the data set's 3:1 imbalance
            label = "PNEUMONIA" if pneumonia else "NORMAL"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            # Two images per synthetic 'patient', as in the real data, to exercise the split;
            # pneumonia named bacterial or viral as Kermany's files are, to exercise the
            # figures by kind (the drawings themselves know no kind).
            patient = i // 2 + (0 if split == "train" else 10_000)
            kind = ("bacteria" if i % 3 == 1 else "virus") if pneumonia else "synthetic"
            name = f"person{patient}_{kind}_{i}.png"
            path = folder / name
            try:
                Image.fromarray(synthetic_xray(rng, size, pneumonia)).save(path)
            except OSError as e:  # Pillow's names no file (a full disk)
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    (root / "SYNTHETIC.txt").write_text(SYNTHETIC_NOTE + "\n")
    return root
