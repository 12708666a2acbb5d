"""The course report's network, layer for layer: a small Keras CNN with separable convolutions.

With 3-channel 224 px input it has 6,642,594 parameters as Keras counts them (6,640,226
trainable plus 2,368 BatchNorm moving statistics). Keras defaults are kept on purpose: Glorot
uniform kernels, zero biases, BatchNorm momentum 0.99 and epsilon 1e-3, 'same' padding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pneumoscan.models.registry import register_model

KERAS_BN = {"eps": 1e-3, "momentum": 0.01}  # Keras momentum 0.99 is PyTorch momentum 0.01


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D: a depthwise 3x3 (no bias) followed by a pointwise 1x1 with bias."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1),
        )


def separable_block(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    layers = [
        SeparableConv2d(in_ch, out_ch),
        nn.ReLU(inplace=True),
        SeparableConv2d(out_ch, out_ch),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_ch, **KERAS_BN),
        nn.MaxPool2d(2),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def dense_block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(out_features, **KERAS_BN),
        nn.Dropout(dropout),
    )


STEM = ("conv1", "relu1", "conv2", "relu2", "pool")  # the layers at full resolution


class SeedCNN(nn.Module):
    gradcam_layer = "features.block4"
    stem_checkpointing = False  # checkpoint_stem(): recompute the stem in backward

    def __init__(self, in_chans: int = 3, num_classes: int = 2, image_size: int = 224):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"seed_cnn needs an image size divisible by 32, got {image_size}")
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(in_chans, 16, 3, padding=1))
        self.features.add_module("relu1", nn.ReLU(inplace=True))
        self.features.add_module("conv2", nn.Conv2d(16, 16, 3, padding=1))
        self.features.add_module("relu2", nn.ReLU(inplace=True))
        self.features.add_module("pool", nn.MaxPool2d(2))
        self.features.add_module("block1", separable_block(16, 32, 0.0))
        self.features.add_module("block2", separable_block(32, 64, 0.0))
        self.features.add_module("block3", separable_block(64, 128, 0.2))
        self.features.add_module("block4", separable_block(128, 256, 0.2))
        side = image_size // 32
        self.classifier = nn.Sequential(
            nn.Flatten(),
            dense_block(256 * side * side, 512, 0.7),
            dense_block(512, 128, 0.5),
            dense_block(128, 64, 0.3),
            nn.Linear(64, num_classes),  # softmax is applied by the loss and at prediction
        )
        self.apply(_keras_init)

    def checkpoint_stem(self, enable: bool = True) -> None:
        """Keep none of the stem's activations for backward; compute them again there instead.

        The two full-resolution convolutions hold the largest activations of a training step
        (about 240 MB at 224 px, batch 32: a quarter of the step's memory), for about a fifth
        more time a step. The stem has no BatchNorm and no dropout, so computing it twice gives
        the same numbers and leaves no running statistic updated twice (timm's
        ``set_grad_checkpointing`` recomputes whole stages, BatchNorm included).
        """
        self.stem_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.stem_checkpointing and self.training and torch.is_grad_enabled()):
            return self.classifier(self.features(x))
        x = checkpoint(self._stem, x, use_reentrant=False)
        for name, layer in self.features.named_children():
            if name not in STEM:
                x = layer(x)
        return self.classifier(x)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for name in STEM:
            x = self.features.get_submodule(name)(x)
        return x


def _keras_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)  # Keras' glorot_uniform
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model
def seed_cnn(in_chans: int = 3, num_classes: int = 2, image_size: int = 224, **_) -> nn.Module:
    """The report's CNN (6,642,594 parameters at 3 x 224 x 224, counted as Keras does)."""
    return SeedCNN(in_chans=in_chans, num_classes=num_classes, image_size=image_size)
