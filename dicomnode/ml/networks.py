"""Network factories (MONAI), one per method of the founding studies, with configurable width.

=====================  ==================================================  ===========================
factory                what it does                                         founding study
=====================  ==================================================  ===========================
``seg_unet``           3D U-Net, vertebra segmentation + level labelling    (a), (c) first stage
``seg_segresnet``      3D SegResNet, same task                              (c) first stage
``densenet121_3d``     3D DenseNet-121 on a vertebral crop: vBMD            (a), (b), (c)
                       regression and/or osteoporosis classification
``resnet50_2d``        2D ResNet-50 on mid-sagittal reformats: BMD + TBS;   (d), (e)
                       also for radiographs (classification)
=====================  ==================================================  ===========================

Full-size defaults reproduce the published architectures; ``width`` (and for DenseNet ``block_config``)
shrink them so tests train in seconds. Every factory is pure (no weights are ever downloaded:
``pretrained`` is never passed). :data:`FACTORIES` is the registry bundles name in their manifest, so a
bundle is rebuilt from code we ship, never from code named in a config file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.nets.densenet import DenseNet
from monai.networks.nets.resnet import ResNet
from monai.networks.nets.segresnet import SegResNet
from monai.networks.nets.unet import UNet
from torch import nn


def seg_unet(n_classes: int = 8, width: int = 16, in_channels: int = 1, num_res_units: int = 2) -> nn.Module:
    """3D U-Net (MONAI ``UNet``) with four resolution levels.

    Parameters
    ----------
    n_classes : int
        Output channels including background (8 = background + T11..L5).
    width : int
        Channels of the first level; each deeper level doubles them.
    in_channels : int
        Input channels.
    num_res_units : int
        Residual units per block.

    Returns
    -------
    torch.nn.Module
        Logits of shape ``(B, n_classes, D, H, W)``; input sides must be multiples of 8.
    """
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=n_classes,
        channels=(width, width * 2, width * 4, width * 8),
        strides=(2, 2, 2),
        num_res_units=num_res_units,
        norm="batch",
    )


def seg_segresnet(n_classes: int = 8, width: int = 16, in_channels: int = 1) -> nn.Module:
    """3D SegResNet (MONAI) with ``init_filters=width``.

    Parameters
    ----------
    n_classes : int
        Output channels including background.
    width : int
        Initial filters.
    in_channels : int
        Input channels.

    Returns
    -------
    torch.nn.Module
        Logits ``(B, n_classes, D, H, W)``; input sides must be multiples of 8.
    """
    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=n_classes,
        init_filters=width,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


class _ScaledHead(nn.Module):
    """Wraps a backbone so its outputs come in physical units (``out * scale + offset``).

    Why: regression targets in mg/cm3 (tens to hundreds) train badly as raw outputs; keeping the scaling in
    the module means the saved bundle returns mg/cm3 directly and nobody re-applies it by hand.
    """

    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self, backbone: nn.Module, scale: Sequence[float], offset: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("scale", torch.tensor(list(scale), dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(list(offset), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out * self.scale + self.offset


def densenet121_3d(
    out_channels: int = 1,
    width: int = 64,
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    in_channels: int = 1,
    output_scale: Sequence[float] | None = None,
    output_offset: Sequence[float] | None = None,
) -> nn.Module:
    """3D DenseNet-121 (MONAI ``DenseNet``) for per-vertebra vBMD regression or classification.

    Parameters
    ----------
    out_channels : int
        1 for vBMD regression, 2 for classification logits (or more heads).
    width : int
        ``init_features`` (64 in DenseNet-121).
    growth_rate : int
        Growth rate (32 in DenseNet-121).
    block_config : sequence of int
        Layers per dense block ((6, 12, 24, 16) in DenseNet-121).
    in_channels : int
        Input channels (1 = HU crop, 2 = crop + vertebral-body mask).
    output_scale, output_offset : sequence of float, optional
        Affine map of the outputs into physical units (e.g. 100, 100 -> mg/cm3).

    Returns
    -------
    torch.nn.Module
        ``(B, out_channels)``.
    """
    net: nn.Module = DenseNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        init_features=width,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
    )
    if output_scale is not None or output_offset is not None:
        net = _ScaledHead(
            net,
            output_scale if output_scale is not None else [1.0] * out_channels,
            output_offset if output_offset is not None else [0.0] * out_channels,
        )
    return net


def resnet50_2d(
    out_channels: int = 2,
    width: int = 64,
    in_channels: int = 1,
    layers: Sequence[int] = (3, 4, 6, 3),
    output_scale: Sequence[float] | None = None,
    output_offset: Sequence[float] | None = None,
) -> nn.Module:
    """2D ResNet-50 (bottleneck blocks) for sagittal reformats (BMD + TBS) or radiographs (classes).

    Parameters
    ----------
    out_channels : int
        2 for (BMD, TBS) regression on sagittal CT (study d); number of classes for radiographs (study e).
    width : int
        Planes of the first stage (64 in ResNet-50); later stages double them.
    in_channels : int
        Input channels.
    layers : sequence of int
        Bottleneck blocks per stage ((3, 4, 6, 3) in ResNet-50).
    output_scale, output_offset : sequence of float, optional
        Affine map of the outputs into physical units.

    Returns
    -------
    torch.nn.Module
        ``(B, out_channels)``.
    """
    net: nn.Module = ResNet(
        block="bottleneck",
        layers=list(layers),
        block_inplanes=[width, width * 2, width * 4, width * 8],
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=out_channels,
    )
    if output_scale is not None or output_offset is not None:
        net = _ScaledHead(
            net,
            output_scale if output_scale is not None else [1.0] * out_channels,
            output_offset if output_offset is not None else [0.0] * out_channels,
        )
    return net


#: Factory name (as written in a bundle manifest) -> factory. The only networks a bundle may name.
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "seg_unet": seg_unet,
    "seg_segresnet": seg_segresnet,
    "densenet121_3d": densenet121_3d,
    "resnet50_2d": resnet50_2d,
}


def build(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a registered network.

    Parameters
    ----------
    factory : str
        A key of :data:`FACTORIES`.
    kwargs : dict
        Its keyword arguments.

    Returns
    -------
    torch.nn.Module
        The network (random weights).

    Raises
    ------
    KeyError
        Unknown factory.
    TypeError
        Unknown argument.
    """
    return FACTORIES[factory](**kwargs)


def n_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(int(p.numel()) for p in net.parameters() if p.requires_grad)


def _register_knee() -> None:
    # the other networks of founding study (e)'s comparison live in their own module
    from dicomnode.ml.knee_networks import KNEE_FACTORIES

    FACTORIES.update(KNEE_FACTORIES)


_register_knee()
