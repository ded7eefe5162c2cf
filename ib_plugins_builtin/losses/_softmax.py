"""Softmax losses: (weighted) cross-entropy, softmax focal, LDAM, prior-shifted CE, label-aware smoothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ib_plugins_builtin.losses._base import ClassificationLoss, as_buffer, one_hot_like

Normalisation = Literal["batch", "weight_sum"]


def _weighted_normaliser(weights: Tensor | None, targets: Tensor, normalisation: Normalisation) -> Tensor | int:
    """N, or sum_i w_{y_i} (PyTorch's weighted mean) when weighted and ``normalisation == 'weight_sum'``.

    The sum is 0 when every sample's class has weight 0; the base class then returns a loss of 0.
    """
    if weights is None or normalisation == "batch":
        return targets.shape[0]
    return weights[targets].sum()


def _focal_modulator(ce: Tensor, gamma: float) -> Tensor:
    """(1 - exp(-ce))^gamma, exactly as LDAM-DRW computes it, with a finite gradient where it is 0.

    For 0 < gamma < 1 the derivative of x^gamma is infinite at x = 0, which a confidently right
    sample (or one of weight 0) reaches once exp(-ce) rounds to 1; autograd then gives inf * 0 = NaN.
    The base is replaced by 1 there and the result by 0 (the value), so the gradient through it is 0,
    the limit of d/dce [(1 - e^-ce)^gamma * ce] as ce -> 0. Elsewhere values and gradients are unchanged.
    """
    one_minus_p = 1.0 - torch.exp(-ce)
    positive = one_minus_p > 0
    safe_base = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe_base**gamma, torch.zeros_like(one_minus_p))


class CrossEntropyLoss(ClassificationLoss):
    """Cross-entropy with optional label smoothing and class weights.

    Per sample the term is PyTorch's ``F.cross_entropy(..., weight=w, label_smoothing=eps, reduction='none')``;
    ``weight_sum`` divides the sum by sum_i w_{y_i} (PyTorch's ``reduction='mean'``), ``batch`` by N
    (Cui et al.'s class-balanced softmax loss).
    """

    def __init__(
        self,
        num_classes: int | None,
        class_weights: Sequence[float] | None,
        *,
        label_smoothing: float,
        normalisation: Normalisation,
        check_targets: bool | None,
        device: torch.device,
        name: str = "cross_entropy",
    ) -> None:
        super().__init__(name, num_classes, class_weights, check_targets=check_targets, device=device)
        self.label_smoothing = label_smoothing
        self.normalisation: Normalisation = normalisation

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        weights = self.weights_on(logits)
        terms = F.cross_entropy(logits, targets, weight=weights, label_smoothing=self.label_smoothing, reduction="none")
        return terms, _weighted_normaliser(weights, targets, self.normalisation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing}, normalisation={self.normalisation}"


class SoftmaxFocalLoss(ClassificationLoss):
    """LDAM-DRW's softmax focal loss: ce_i = w_{y_i} * CE_i, p_i = exp(-ce_i), mean_i (1 - p_i)^gamma * ce_i.

    As in the official code, p is computed from the *weighted* per-sample cross-entropy, and the
    mean is over the batch (N), weighted or not.
    """

    def __init__(
        self,
        num_classes: int | None,
        class_weights: Sequence[float] | None,
        *,
        gamma: float,
        check_targets: bool | None,
        device: torch.device,
    ) -> None:
        super().__init__("focal", num_classes, class_weights, check_targets=check_targets, device=device)
        self.gamma = gamma
        self.variant = "softmax"

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        ce = F.cross_entropy(logits, targets, weight=self.weights_on(logits), reduction="none")
        if self.gamma == 0:
            return ce, targets.shape[0]
        return _focal_modulator(ce, self.gamma) * ce, targets.shape[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant=softmax, gamma={self.gamma}"


class LDAMLoss(ClassificationLoss):
    """LDAM: CE on s * (z - m_y * onehot(y)); weighted mean over sum_i w_{y_i} when weighted (official code)."""

    margins: Tensor

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | None,
        *,
        margins: Sequence[float],
        scale: float,
        check_targets: bool | None,
        device: torch.device,
    ) -> None:
        super().__init__("ldam", num_classes, class_weights, check_targets=check_targets, device=device)
        self.register_buffer("margins", as_buffer(margins, device), persistent=False)
        self.s = scale

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        margin = self.margins.to(device=logits.device, dtype=logits.dtype)[targets]
        one_hot = one_hot_like(logits, targets)
        adjusted = logits - margin[:, None] * one_hot
        weights = self.weights_on(logits)
        terms = F.cross_entropy(self.s * adjusted, targets, weight=weights, reduction="none")
        return terms, _weighted_normaliser(weights, targets, "weight_sum")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, max_m={float(self.margins.max()):.4g}"


class PriorShiftedCrossEntropy(ClassificationLoss):
    """CE on z + b with a fixed per-class shift b: Balanced Softmax (b = log n) or logit adjustment (b = tau log pi)."""

    shift: Tensor

    def __init__(self, name: str, shift: Sequence[float], *, check_targets: bool | None, device: torch.device) -> None:
        super().__init__(name, len(shift), None, check_targets=check_targets, device=device)
        self.register_buffer("shift", as_buffer(shift, device), persistent=False)

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        shifted = logits + self.shift.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(shifted, targets, reduction="none"), targets.shape[0]


class LabelAwareSmoothingLoss(ClassificationLoss):
    """MiSLAS: (1 - eps_y) * (-log p_y) + eps_y * mean_c(-log p_c), averaged over the batch (official code)."""

    smoothing: Tensor

    def __init__(self, smoothing: Sequence[float], *, check_targets: bool | None, device: torch.device) -> None:
        super().__init__("label_aware_smoothing", len(smoothing), None, check_targets=check_targets, device=device)
        self.register_buffer("smoothing", as_buffer(smoothing, device), persistent=False)

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        log_probs = F.log_softmax(logits, dim=-1)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=-1)
        eps = self.smoothing.to(device=logits.device, dtype=logits.dtype)[targets]
        return (1.0 - eps) * nll + eps * uniform, targets.shape[0]
