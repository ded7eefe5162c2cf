"""What a mixing run's step shares between the sequential and the fused path: the plan, and the loss.

A mixed batch's loss is ``loss(z, y, w) + loss(z, y[perm], 1 - w)`` with ``w`` the plan's per-sample
target weight (the ``sample_weight`` of the :class:`~ibcore.protocols.Loss` protocol).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ibcore.protocols import MixPlan


def draw_plan(mixer: Any, x: Tensor, y: Tensor, generator: torch.Generator) -> MixPlan:
    """The mixer's plan for this batch, its tensors moved to the batch's device."""
    plan: MixPlan = mixer.plan(x, y, generator)
    plan.permutation = plan.permutation.to(x.device)
    plan.target_weight = plan.target_weight.to(device=x.device, dtype=torch.float32)
    return plan


def mixed_loss(loss: Any, logits: Tensor, y: Tensor, plan: MixPlan) -> Tensor:
    """The loss of a mixed batch: each sample's own label weighted by the plan, its partner's by the rest."""
    return loss(logits, y, plan.target_weight) + loss(logits, y[plan.permutation], 1.0 - plan.target_weight)  # type: ignore[no-any-return]
