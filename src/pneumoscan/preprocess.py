"""uint8 gray images -> the float tensors a model takes. One definition, used everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_model_input(
    images: torch.Tensor, *, in_chans: int, mean: float, std: float, size: int | None = None
) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, in_chans, size, size) float: (x / 255 - mean) / std."""
    x = images.unsqueeze(1).float().div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = (x - mean) / std
    return x.expand(-1, in_chans, -1, -1) if in_chans > 1 else x
