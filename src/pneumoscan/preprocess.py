"""uint8 gray images -> the float tensors a model takes. One definition, used everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Images per evaluation batch are bounded by pixels, not by count: a 16-channel float activation
# of 64 images at 224 px is about 200 MB, and a batch of 256 at that size would need gigabytes.
EVAL_PIXELS_PER_BATCH = 64 * 224 * 224


def eval_batch_size(image_size: int, cap: int = 256) -> int:
    return max(1, min(cap, EVAL_PIXELS_PER_BATCH // (image_size * image_size)))


def to_model_input(
    images: torch.Tensor, *, in_chans: int, mean: float, std: float, size: int | None = None
) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, in_chans, size, size) float: (x / 255 - mean) / std."""
    x = images.unsqueeze(1).float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = (x - mean) / std
    return x.expand(-1, in_chans, -1, -1) if in_chans > 1 else x
