"""CIFAR-size residual networks (32x32 inputs, 3x3 stem, no max-pool).

- :class:`BasicBlock` — post-activation block (He et al. 2016a). Option "A" shortcut (parameter-free:
  subsample + zero-pad channels half before and half after, as in the pretrained ResNet-20/32/44/56 of
  ``shared/data/weights``) or option "B" (1x1 conv + BN projection, kuangliu style; Xiang's ResNet-18).
- :class:`PreActBlock` / :class:`PreActBottleneck` — pre-activation blocks (He et al. 2016b), the blocks of
  the ReScaler models (rescaler_appendix.txt §A); a grouped bottleneck gives ResNeXt-29 (32x4d).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._init import init_he_normal


class ShortcutA(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` with zero channels padded half before, half after."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = ShortcutA(in_planes, planes, stride)
            elif option == "B":
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))
            else:
                raise ValueError(f"shortcut option must be 'A' or 'B', got {option!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, add identity (or 1x1 projection of the pre-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 -> 3x3 (``groups`` > 1 for ResNeXt) -> 1x1, add shortcut."""

    def __init__(self, in_planes: int, width: int, out_planes: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """Post-activation CIFAR ResNet: stem conv-BN-ReLU, stages of :class:`BasicBlock`, GAP, ``linear``.

    ``widths=(16, 32, 64)``, ``depths=(n, n, n)``, option "A" is the ResNet-(6n+2) family;
    ``widths=(16, 32, 64, 64)``, ``depths=(2, 2, 2, 2)``, option "B" is Xiang's compact ResNet-18.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride, option))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.linear = nn.Linear(in_planes, num_classes)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """He-normal (fan-in) convolution and linear weights, torch's defaults elsewhere, from ``generator``."""
        init_he_normal(self, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class PreActResNet(nn.Module):
    """Pre-activation ResNet / ResNeXt for 32x32 inputs: stem conv, stages of pre-activation blocks,
    final BN-ReLU, GAP, ``linear``."""

    def __init__(self, block: str, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 stem: int = 64, groups: int = 1, expansion: int = 1, bottleneck_widths: Sequence[int] = ()) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        in_planes = stem
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                if block == "basic":
                    blocks.append(PreActBlock(in_planes, width, stride))
                    in_planes = width
                elif block == "bottleneck":
                    out = width * expansion
                    blocks.append(PreActBottleneck(in_planes, bottleneck_widths[i], out, stride, groups))
                    in_planes = out
                else:
                    raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """He-normal (fan-out) convolution weights, torch's defaults elsewhere, from ``generator``."""
        init_he_normal(self, generator, mode="fan_out", layers=(nn.Conv2d,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet(depths: Sequence[int], num_classes: int, bottleneck: bool = False,
                  widths: Sequence[int] = (64, 128, 256, 512), stem: int = 64) -> PreActResNet:
    if bottleneck:
        return PreActResNet("bottleneck", depths, widths, num_classes, stem=stem, expansion=4,
                            bottleneck_widths=widths)
    return PreActResNet("basic", depths, widths, num_classes, stem=stem)


def resnext_cifar(depths: Sequence[int], num_classes: int, cardinality: int, bottleneck_width: int,
                  stem: int = 64) -> PreActResNet:
    """ResNeXt (Xie et al. 2017) with pre-activation grouped bottlenecks: stage i has group width
    ``cardinality * bottleneck_width * 2**i`` and output width twice that (ResNeXt-29 32x4d: 128/256/512)."""
    group_widths = [cardinality * bottleneck_width * 2 ** i for i in range(len(depths))]
    return PreActResNet("bottleneck", depths, group_widths, num_classes, stem=stem, groups=cardinality,
                        expansion=2, bottleneck_widths=group_widths)
