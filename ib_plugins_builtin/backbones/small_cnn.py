"""A small CNN for digits and other tiny images: fast enough to train in seconds on two CPU cores.

Two stages of 3x3 conv - BatchNorm - ReLU - 2x2 max-pool (``width`` then ``2 * width``
channels), then an adaptive average pool to a 2x2 grid, flattened to ``8 * width`` features.
Keeping a coarse 2x2 layout instead of a global pool matters for digits: in a 3-epoch run on
the embedded MNIST subset it reached about 91% test accuracy against 69% with a global pool.
Any input size of at least 4x4 works. Weights use PyTorch's default initialisation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ib_plugins_builtin.backbones._common import StagedBackbone

POOLED_GRID = 2  # the head keeps a POOLED_GRID x POOLED_GRID spatial layout


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


class SmallCnn(StagedBackbone):
    """conv(width)-BN-ReLU-pool, conv(2*width)-BN-ReLU-pool, 2x2 average pool, classifier."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        width: int = 16,
        classifier: str = "linear",
        sigmoid_bias_init: bool = False,
    ) -> None:
        super().__init__()
        self.backbone_name = "small_cnn"
        self.stem = nn.Identity()
        self.stages = nn.ModuleList([_conv_stage(in_channels, width), _conv_stage(width, 2 * width)])
        self.feature_dim = 2 * width * POOLED_GRID * POOLED_GRID
        self._finish(num_classes, classifier, sigmoid_bias_init, init="default")

    def pool(self, hidden: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(hidden, POOLED_GRID).flatten(1)
