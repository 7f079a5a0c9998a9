"""ResNet18 for CIFAR-10 (32×32 inputs), the variant of kuangliu/pytorch-cifar.

Differences from the ImageNet ResNet18 of He et al. (2016): the stem is one
3×3 convolution with 64 channels, stride 1, and **no max-pool**, so the four
stages see 32, 16, 8 and 4 pixels; the head is a 4×4 average pool and
``Linear(512, num_classes)``. Convolutions have no bias (BatchNorm follows
each). A block whose stride or width changes gets a 1×1 convolution + BN
shortcut; other blocks add the identity.

Parameter count for 10 classes (tested): 11,173,962.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipscope.models._checks import check_positive_int

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers and a residual: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))``.

    ``s`` is the identity, or ``BN(Conv1×1(x, stride))`` when ``stride != 1`` or
    the width changes.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output (spatial size divided by ``stride``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet: 3×3 stem (no max-pool), four ``BasicBlock`` stages, 4×4 avg pool, linear head.

    Parameters
    ----------
    num_blocks : sequence of 4 ints
        Blocks per stage; ``(2, 2, 2, 2)`` is ResNet18.
    num_classes : int
        Output width of the linear head.
    """

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__()
        if len(num_blocks) != 4 or any(int(b) < 1 for b in num_blocks):
            raise ValueError(f"num_blocks must be 4 positive ints, got {num_blocks!r}")
        check_positive_int(num_classes, "num_classes")
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip(
            (64, 128, 256, 512), num_blocks, (1, 2, 2, 2), strict=True
        ):
            layers = []
            for s in [stride] + [1] * (int(blocks) - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input of shape (N, 3, 32, 32), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


def resnet18_cifar(num_classes: int = 10) -> ResNetCIFAR:
    """ResNet18 for 32×32 images: ``BasicBlock`` × [2, 2, 2, 2], 64/128/256/512 channels.

    >>> sum(p.numel() for p in resnet18_cifar().parameters())
    11173962
    """
    return ResNetCIFAR((2, 2, 2, 2), num_classes)
