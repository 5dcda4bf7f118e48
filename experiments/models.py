"""The ResNets of the supervised CIFAR runs, without Avalanche.

A ResNet for 32×32 images (He et al. 2016, "Deep Residual Learning", the
CIFAR variant): a 3×3 stem, four stages of basic blocks with ``width``,
2·``width``, 4·``width`` and 8·``width`` channels (stride 2 from the second
stage on), 4×4 average pooling and a linear classifier. ``width`` 20 is the
reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017), 64 the standard one. The
layers are created in the same order, with the same names and shapes, as
Avalanche's ``slim_resnet18.ResNet``, so that a seed gives the same
initial weights and checkpoints load in either.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv3x3(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm, added to the input (through a
    1×1 convolution where the shape changes)."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(channels_in, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """``blocks`` basic blocks per stage (ResNet-18: 2, 2, 2, 2; ResNet-34:
    3, 4, 6, 3), ``width`` base channels, ``classes`` outputs."""

    def __init__(self, blocks: tuple[int, int, int, int], classes: int, width: int):
        super().__init__()
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        channels_in = width
        for i, n in enumerate(blocks):
            channels = width * 2**i
            stage = []
            for j in range(n):
                stage.append(BasicBlock(channels_in, channels, stride=2 if (i > 0 and j == 0) else 1))
                channels_in = channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(channels_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x.view(len(x), 3, 32, 32))))
        y = self.layer4(self.layer3(self.layer2(self.layer1(y))))
        return self.linear(F.avg_pool2d(y, 4).flatten(1))


#: model name -> blocks per stage
RESNETS = {"slim_resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
