"""The CIFAR ResNets of He et al. (CVPR 2016, section 4.2), as used by LDAM-DRW and most CIFAR-LT papers.

A 3x3 stem of 16 channels, then 3 stages of ``n`` basic blocks with 16, 32 and 64 channels
(depth = 6n + 2), global average pooling and a classifier. Shortcuts follow option A: identity,
or a stride-2 subsample zero-padded to the new channel count, so shortcuts add no parameters
(ResNet-32 on 10 classes: 464,154 parameters). Conv and linear weights are Kaiming-normal, as in
LDAM-DRW's ``models/resnet_cifar.py``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ib_plugins_builtin.backbones._common import StagedBackbone

DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
STAGE_CHANNELS: tuple[int, int, int] = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        subsampled = x[:, :, :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation, ResNet v1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(StagedBackbone):
    """ResNet-``depth`` for 32x32 images (depth = 6n + 2), with a linear or cosine classifier."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        classifier: str = "linear",
        sigmoid_bias_init: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.backbone_name = f"resnet{depth}"
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STAGE_CHANNELS[0]),
            nn.ReLU(inplace=False),
        )
        stages = []
        channels = STAGE_CHANNELS[0]
        for index, out_channels in enumerate(STAGE_CHANNELS):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, out_channels, first_stride if block_index == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
        self._finish(num_classes, classifier, sigmoid_bias_init, init="kaiming")

    def pool(self, hidden: Tensor) -> Tensor:
        return hidden.mean(dim=(2, 3))
