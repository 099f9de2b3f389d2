"""Level naming from segmented bodies, splitting of merged bodies, Dice, and the network factories."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dicomnode.ml import datasets as ds
from dicomnode.ml import networks as nw
from dicomnode.ml.inference import dice_per_level, label_levels, split_bodies

TINY_UNET = {"n_classes": 3, "width": 4, "num_res_units": 0}


def test_levels_named_from_the_sacrum_up() -> None:
    case = ds.synthetic_case(8)
    targets = ds.map_seg_targets(case.labels, "dicomnode")
    labels, notes = label_levels(targets, case.volume.canonical())
    dice = dice_per_level(ds.map_labels(case.labels, "dicomnode"), labels)
    assert set(dice) == set(ds.LEVEL_CLASSES) and min(dice.values()) == pytest.approx(1.0)
    assert notes == []
    # without the sacrum the count still starts at the lowest body, but says it is uncertain
    no_sacrum = np.where(targets == ds.SEG_SACRUM, 0, targets)
    _, notes = label_levels(no_sacrum, case.volume.canonical())
    assert any("uncertain" in n for n in notes)


def test_merged_bodies_are_split_across_a_thin_bridge() -> None:
    mask = np.zeros((40, 30, 30), bool)
    mask[2:17, 5:25, 5:25] = True
    mask[21:36, 5:25, 5:25] = True
    mask[17:21, 14:16, 14:16] = True  # a 2-voxel bridge through the disc
    comp, n = split_bodies(mask, (1.0, 1.0, 1.0))
    assert n == 2
    assert len(np.unique(comp[2:17, 5:25, 5:25])) == 1 and len(np.unique(comp[21:36, 5:25, 5:25])) == 1
    assert comp[10, 10, 10] != comp[30, 10, 10]
    assert np.array_equal(comp > 0, mask)


@pytest.mark.parametrize(
    ("factory", "kwargs", "shape", "out"),
    [
        ("seg_unet", TINY_UNET, (1, 1, 16, 16, 16), (1, 3, 16, 16, 16)),
        ("seg_segresnet", {"n_classes": 3, "width": 8}, (1, 1, 16, 16, 16), (1, 3, 16, 16, 16)),
        (
            "densenet121_3d",
            {"out_channels": 1, "width": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1],
             "output_scale": [100.0], "output_offset": [100.0]},
            (2, 1, 32, 32, 32),
            (2, 1),
        ),
        ("resnet50_2d", {"out_channels": 2, "width": 4}, (2, 1, 32, 32), (2, 2)),
    ],
)  # fmt: skip
def test_factories_build_tiny_networks(
    factory: str, kwargs: dict[str, object], shape: tuple[int, ...], out: tuple[int, ...]
) -> None:
    net = nw.build(factory, kwargs).eval()
    with torch.no_grad():
        y = net(torch.zeros(shape))
    assert tuple(y.shape) == out


def test_full_size_architectures_match_the_papers() -> None:
    # DenseNet-121: 6/12/24/16 dense layers, growth 32, 64 initial features; ResNet-50: 3/4/6/3 bottlenecks
    dn = nw.densenet121_3d(out_channels=1)
    n_dense = sum(1 for name, _ in dn.named_modules() if re.search(r"denselayer\d+$", name))
    assert n_dense == 6 + 12 + 24 + 16
    rn = nw.resnet50_2d(out_channels=2)
    assert [len(getattr(rn, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert 23_000_000 < nw.n_parameters(rn) < 24_000_000  # ResNet-50 without the 1000-class head
