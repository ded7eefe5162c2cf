"""The Vector-Scaling loss module (imported lazily by ``vs.build_vs``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ib_plugins_builtin.losses._base import ClassificationLoss, as_buffer
from ib_plugins_builtin.losses._softmax import _weighted_normaliser


class VectorScalingLoss(ClassificationLoss):
    """Kini et al.'s VS loss: l_i = w_{y_i} CE(Delta * z_i + iota, y_i), Delta and iota per class.

    Unweighted, the mean over the batch; weighted, sum_i w_{y_i} l_i / sum_i w_{y_i} (the official
    ``F.cross_entropy(output, target, weight=...)``).
    """

    scales: Tensor
    offsets: Tensor

    def __init__(
        self,
        class_weights: Sequence[float] | None,
        *,
        scales: Sequence[float],
        offsets: Sequence[float],
        gamma: float,
        tau: float,
        check_targets: bool | None,
        device: torch.device,
    ) -> None:
        super().__init__("vs", len(scales), class_weights, check_targets=check_targets, device=device)
        self.register_buffer("scales", as_buffer(scales, device), persistent=False)
        self.register_buffer("offsets", as_buffer(offsets, device), persistent=False)
        self.gamma = gamma
        self.tau = tau

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        scales = self.scales.to(device=logits.device, dtype=logits.dtype)
        offsets = self.offsets.to(device=logits.device, dtype=logits.dtype)
        weights = self.weights_on(logits)
        terms = F.cross_entropy(logits * scales + offsets, targets, weight=weights, reduction="none")
        return terms, _weighted_normaliser(weights, targets, "weight_sum")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, tau={self.tau}"
