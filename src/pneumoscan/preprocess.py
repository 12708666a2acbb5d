"""uint8 gray images -> the float tensors a model takes. One definition, used everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Images per evaluation batch are bounded by pixels, not by count: a 16-channel float activation
# of 64 images at 224 px is about 200 MB, and a batch of 256 at that size would need gigabytes.
EVAL_PIXELS_PER_BATCH = 64 * 224 * 224
# A GPU has the memory for batches this many times larger, and needs them to be kept busy.
GPU_EVAL_FACTOR = 8


def eval_batch_size(image_size: int, cap: int = 256, device_type: str = "cpu") -> int:
    factor = GPU_EVAL_FACTOR if device_type == "cuda" else 1
    return max(1, min(cap * factor, factor * EVAL_PIXELS_PER_BATCH // (image_size * image_size)))


def to_model_input(
    images: torch.Tensor, *, in_chans: int, mean: float, std: float, size: int | None = None
) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, in_chans, size, size) float: (x / 255 - mean) / std."""
    x = to_unit_float(images)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return normalize(x, in_chans=in_chans, mean=mean, std=std)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float in [0, 1]: where training augments."""
    return images.unsqueeze(1).float().div_(255.0)


def normalize(x: torch.Tensor, *, in_chans: int, mean: float, std: float) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> the model's input: (x - mean) / std, repeated over channels."""
    x = (x - mean) / std
    return x.expand(-1, in_chans, -1, -1) if in_chans > 1 else x
