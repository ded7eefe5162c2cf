"""Sigmoid (one-vs-all) losses: sigmoid focal loss and its gamma = 0 case, sigmoid cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ib_plugins_builtin.losses._base import ClassificationLoss, one_hot_like


class SigmoidFocalLoss(ClassificationLoss):
    """Sum over classes and samples of w_{y_i} * (1 - p_t)^gamma * BCE(z_ic, onehot_ic), divided by N.

    Cui et al.'s official code: the weight of sample i's true class multiplies all C of its terms and
    the sum is divided by the number of positive labels (N for one-hot targets). The modulator is
    exp(-gamma * (t*z + softplus(-z))), Cui et al.'s stable form with softplus in place of
    log1p(exp(-z)), which also stays finite for very negative logits. gamma = 0 is sigmoid cross-entropy.
    """

    def __init__(
        self,
        num_classes: int | None,
        class_weights: Sequence[float] | None,
        *,
        gamma: float,
        check_targets: bool | None,
        device: torch.device,
        name: str = "focal",
    ) -> None:
        super().__init__(name, num_classes, class_weights, check_targets=check_targets, device=device)
        self.gamma = gamma
        self.variant = "sigmoid"

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        one_hot = one_hot_like(logits, targets)
        elementwise = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        if self.gamma != 0:
            elementwise = elementwise * torch.exp(-self.gamma * (one_hot * logits + F.softplus(-logits)))
        terms = elementwise.sum(dim=1)
        weights = self.weight_of(targets, terms)
        if weights is not None:
            terms = terms * weights
        return terms, targets.shape[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant=sigmoid, gamma={self.gamma}"
