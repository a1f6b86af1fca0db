"""Leaf modules the other layers share: shortcuts and the plain residual blocks.

Nothing here imports another sdkernels module (design §3), so ``ops`` can recognise an
option-A shortcut and ``blocks`` can revert to a plain block without importing
``models``. ``sdkernels.models`` re-exports these under their old names.

The plain blocks match ``torchvision.models.resnet`` (v0.15+) in module names, parameter
names, state_dict keys and forward math: they stand in for torchvision on CPU-only
machines and are what :func:`sdkernels.revert` turns a block built directly as
``sdkernels.BasicBlock`` back into.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

__all__ = ["OptionAShortcut", "BasicBlock", "Bottleneck", "conv3x3", "conv1x1", "is_identity"]


def is_identity(m) -> bool:
    """True for a shortcut that passes its input through (None, Identity, empty Sequential)."""
    return m is None or isinstance(m, nn.Identity) or (
        type(m) is nn.Sequential and len(m) == 0)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: take every ``stride``-th pixel, append zero channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option-A shortcut cannot shrink {in_planes} -> {out_planes} channels")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes))

    def extra_repr(self):
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}"


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)
