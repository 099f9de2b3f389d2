"""The networks of founding study (e)'s comparison, as 2-D classifiers of knee radiographs.

ResNet-50 itself is :func:`dicomnode.ml.networks.resnet50_2d` (MONAI ``ResNet``, bottleneck blocks);
here are the others the study compared it with: ResNet-18 (MONAI ``ResNet``, basic blocks), VGG-16
(13 convolutions in five blocks and a classifier; written here because MONAI has none) and a plain 3-layer
CNN. All take ``width`` (channels of the first stage) so tests train them in seconds; the published widths
are the defaults. No weights are downloaded: every factory builds random weights.
"""

from __future__ import annotations

from monai.networks.nets.resnet import ResNet
from torch import nn


def resnet18_2d(out_channels: int = 2, width: int = 64, in_channels: int = 1) -> nn.Module:
    """2-D ResNet-18 (basic blocks, layers 2-2-2-2); logits ``(B, out_channels)``."""
    net: nn.Module = ResNet(
        block="basic",
        layers=[2, 2, 2, 2],
        block_inplanes=[width, width * 2, width * 4, width * 8],
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=out_channels,
    )
    return net


class _Plain(nn.Module):
    """Convolutional ``features`` (the class-activation layer), global pooling, a ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16_2d(out_channels: int = 2, width: int = 64, in_channels: int = 1, hidden: int = 0) -> nn.Module:
    """2-D VGG-16: convolution blocks of 2-2-3-3-3 layers (width, 2w, 4w, 8w, 8w), each followed by max
    pooling, then two fully connected layers and the output layer. Global average pooling before the
    classifier (instead of VGG's fixed 7 x 7) keeps it independent of the input size.

    Parameters
    ----------
    hidden
        Units of the two hidden fully connected layers (0: ``8 * width``; VGG-16 has 4096).
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for n_conv, c in zip((2, 2, 3, 3, 3), (width, width * 2, width * 4, width * 8, width * 8), strict=True):
        for _ in range(n_conv):
            layers += [nn.Conv2d(channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            channels = c
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    h = hidden or 8 * width
    classifier = nn.Sequential(
        nn.Linear(channels, h),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(h, h),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(h, out_channels),
    )
    return _Plain(nn.Sequential(*layers), classifier)


def cnn3_2d(out_channels: int = 2, width: int = 32, in_channels: int = 1) -> nn.Module:
    """A 3-layer CNN (convolution, ReLU, max pooling, three times) and a linear output: the study's
    simplest baseline."""
    layers: list[nn.Module] = []
    channels = in_channels
    for c in (width, width * 2, width * 4):
        layers += [
            nn.Conv2d(channels, c, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        ]
        channels = c
    return _Plain(nn.Sequential(*layers), nn.Sequential(nn.Linear(channels, out_channels)))


KNEE_FACTORIES = {"resnet18_2d": resnet18_2d, "vgg16_2d": vgg16_2d, "cnn3_2d": cnn3_2d}
