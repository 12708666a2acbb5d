"""Batched random affine augmentation on the model's device, fresh parameters for every image.

This reproduces Keras' ImageDataGenerator(rotation_range, zoom_range, width_shift_range,
height_shift_range, fill_mode="nearest") as the report used it: rotation, independent zoom on
each axis, shift, and edge pixels repeated where the image moves away from a border.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumoscan.config import AugmentConfig


def random_affine_params(
    n: int, cfg: AugmentConfig, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates in [-1, 1] units."""

    def uniform(low: float, high: float) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=generator.device if generator else device)
        return (low + (high - low) * u).to(device)

    angle = uniform(-cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180)
    zx = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    zy = uniform(1 - cfg.zoom, 1 + cfg.zoom)
    tx = uniform(-cfg.shift, cfg.shift) * 2  # a fraction of the width is twice that in [-1, 1]
    ty = uniform(-cfg.shift, cfg.shift) * 2
    flip = torch.ones(n, device=device)
    if cfg.hflip:
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation times zoom: a zoom factor above 1 samples a larger area, i.e. zooms out (as Keras).
    theta = torch.stack(
        [
            torch.stack([cos * zx * flip, -sin * zy, tx], dim=1),
            torch.stack([sin * zx * flip, cos * zy, ty], dim=1),
        ],
        dim=1,
    )
    return theta


def apply_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp a float (N, C, H, W) batch; border pixels are repeated outside the image."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(
    images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random affine per image; a no-op when every range is zero."""
    if not cfg.changes_images:
        return images
    theta = random_affine_params(images.shape[0], cfg, generator, images.device)
    return apply_affine(images, theta)
