"""BatchNorm running statistics that have not settled by the end of a short run.

A BatchNorm layer evaluates with exponential averages of its training batches' mean and
variance, which start at 0 and 1 and keep ``(1 - momentum) ** steps`` of that start. With
PyTorch's momentum (0.1) the start is gone within a hundred steps. With Keras' momentum (0.01,
which the report's CNN keeps), 312 steps still leave 4% of the starting variance of 1, while
that CNN's separable blocks have real variances of 1e-5 down to 1e-8 at 64 px: evaluation then
divides by variances thousands of times too large and every image gets about the same
probability, while training accuracy looks fine. Such statistics are measured again at the end
of training, over training images as evaluation will see them (no augmentation), with torch's
``update_bn``; until then, each epoch is validated on a copy of the model measured so
(train._as_saved), so that early stopping judges the model that would be saved.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

UNSETTLED_SHARE = 1e-6  # above this share of their starting values, statistics are re-measured
MAX_BATCHES = 100  # enough images for stable averages (some 3,000 at batch 32)


def unsettled_share(model: nn.Module) -> float:
    """The largest share of its starting value that any running average still holds (0: none)."""
    shares = [
        (1.0 - m.momentum) ** int(m.num_batches_tracked)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.momentum is not None  # None: a cumulative average, which keeps nothing of its start
    ]
    return max(shares, default=0.0)


def settle_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-measure the running statistics if they have not settled; the images used (0: none).

    ``batches`` are model inputs as in training (same batch size); the first MAX_BATCHES of them
    are used, and the averages become plain means over them. The model's weights and its
    train/eval mode are left as they were.
    """
    if unsettled_share(model) <= UNSETTLED_SHARE:
        return 0
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # update_bn would reset the statistics and measure nothing
        return 0
    seen = 0

    def counted():  # one batch at a time: a list of them at 224 px would take gigabytes
        nonlocal seen
        for x in itertools.chain([first], itertools.islice(batches, MAX_BATCHES - 1)):
            seen += len(x)
            yield x

    update_bn(counted(), model)
    return seen
