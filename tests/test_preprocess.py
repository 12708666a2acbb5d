"""The one definition of model input, and the evaluation batch that bounds memory."""

from __future__ import annotations

import torch

from pneumoscan.preprocess import EVAL_PIXELS_PER_BATCH, eval_batch_size, to_model_input


def test_scaling_channels_and_resize():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = to_model_input(images, in_chans=3, mean=0.5, std=0.25)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.tensor([[-2.0, 2.0], [-1.2, -0.4]]))
    assert torch.equal(x[0, 0], x[0, 2])  # gray replicated
    resized = to_model_input(torch.zeros((2, 8, 8), dtype=torch.uint8), in_chans=1, mean=0,
                             std=1, size=4)
    assert resized.shape == (2, 1, 4, 4)


def test_eval_batch_is_bounded_by_pixels():
    assert eval_batch_size(224) == 64
    assert eval_batch_size(32) == 256  # capped
    assert eval_batch_size(4096) == 1
    for size in (64, 96, 128, 224, 512):
        assert eval_batch_size(size) * size * size <= max(EVAL_PIXELS_PER_BATCH, size * size)
