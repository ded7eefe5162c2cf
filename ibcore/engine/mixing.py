"""What every training step shares for a run's loss: the mixer plan, the (mixed) loss, full-precision logits.

A mixed batch's loss is ``loss(z, y, w) + loss(z, y[perm], 1 - w)`` with ``w`` the plan's per-sample
target weight (the ``sample_weight`` of the :class:`~ibcore.protocols.Loss` protocol). The sequential
step, the fused step and step plugins all compute it with :func:`loss_of`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


@dataclasses.dataclass(frozen=True)
class PlanTensors:
    """K runs' input-mixing plans as tensors of fixed shapes, so a CUDA graph of a stacked step can replay them
    with new values each step (a run that does not mix gets the identity plan).

    ``own`` and ``partner`` weigh a sample's own input and its partner's (``lam`` and ``1 - lam``, computed on
    the host as the mixers do); ``box`` is (top, bottom, left, right), empty (all 0) without one.
    """

    permutation: Tensor  # (K, N) long
    own: Tensor  # (K,) the inputs' dtype
    partner: Tensor  # (K,)
    box: Tensor  # (K, 4) long
    target_weight: Tensor  # (K, N) float32

    def as_tuple(self) -> tuple[Tensor, ...]:
        return (self.permutation, self.own, self.partner, self.box, self.target_weight)

    def plan(self, k: int) -> MixPlan:
        """Run ``k``'s plan for :func:`loss_of` (which reads the permutation and the target weights only)."""
        return MixPlan(permutation=self.permutation[k], lam=float("nan"), target_weight=self.target_weight[k])


def plan_tensors(plans: Sequence[MixPlan | None], batch_size: int, like: Tensor) -> PlanTensors:
    """Pack the plans of K runs (None: not mixing) into :class:`PlanTensors` on ``like``'s device.

    Only the per-run numbers travel from the host (one small copy); permutations and target weights are on the
    device already."""
    device = like.device
    identity = torch.arange(batch_size, device=device)
    ones = torch.ones(batch_size, device=device, dtype=torch.float32)  # draw_plan gives float32 weights
    numbers = [(1.0, 0.0) if p is None or p.box is not None else (p.lam, 1.0 - p.lam) for p in plans]
    boxes = [(0, 0, 0, 0) if p is None or p.box is None else p.box for p in plans]
    return PlanTensors(
        permutation=torch.stack([identity if p is None else p.permutation for p in plans]),
        own=_to(torch.tensor([own for own, _ in numbers], dtype=like.dtype), device),
        partner=_to(torch.tensor([partner for _, partner in numbers], dtype=like.dtype), device),
        box=_to(torch.tensor(boxes, dtype=torch.long), device),
        target_weight=torch.stack([ones if p is None else p.target_weight for p in plans]),
    )


def standard_mix(x: Tensor, plans: PlanTensors, k: int) -> Tensor:
    """Run ``k``'s mixed inputs, as a mixer that declares ``standard_mix`` computes them, with tensor operations
    only: ``x * own + x[permutation] * partner``, and the partner's pixels inside the box. Equal to the mixers'
    own results: the identity (own 1, partner 0, no box) and the outside of a box are ``x`` itself."""
    partner_x = x[plans.permutation[k]]
    blended = x * plans.own[k] + partner_x * plans.partner[k]
    if x.dim() != 4:  # a box needs (N, C, H, W); CutMix refuses other batches when it plans
        return blended
    top, bottom, left, right = plans.box[k]
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    return torch.where(inside, partner_x, blended)


def _to(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without making the host wait for a CUDA device (pinned, non-blocking)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
