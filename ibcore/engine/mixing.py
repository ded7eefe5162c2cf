"""What every training step shares for a run's loss: the mixer plan, the (mixed) loss, full-precision logits.

A mixed batch's loss is ``loss(z, y, w) + loss(z, y[perm], 1 - w)`` with ``w`` the plan's per-sample
target weight (the ``sample_weight`` of the :class:`~ibcore.protocols.Loss` protocol). The sequential
step, the fused step and step plugins all compute it with :func:`loss_of`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ibcore.protocols import Loss, Mixer, MixPlan


def draw_plan(mixer: Mixer, x: Tensor, y: Tensor, generator: torch.Generator) -> MixPlan:
    """The mixer's plan for this batch, its tensors moved to the batch's device."""
    plan: MixPlan = mixer.plan(x, y, generator)
    plan.permutation = plan.permutation.to(x.device)
    plan.target_weight = plan.target_weight.to(device=x.device, dtype=torch.float32)
    return plan


def loss_of(loss: Loss, logits: Tensor, y: Tensor, plan: MixPlan | None = None) -> Tensor:
    """The run's loss on ``logits``: plain, or with each sample's own label weighted by the plan and its
    partner's label by the rest."""
    if plan is None:
        return loss(logits, y)
    return loss(logits, y, plan.target_weight) + loss(logits, y[plan.permutation], 1.0 - plan.target_weight)


def full_precision(logits: Tensor) -> Tensor:
    """Losses see float32 logits under bf16 autocast (and float64 when a test runs in float64)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
