"""Built-in optimizers with their learning-rate schedules (registered on import; torch is imported by the factories).

A schedule is part of the optimizer's params (flat): ``schedule``, ``warmup_epochs``,
``warmup_start_factor``, ``warmup_per_iteration``, ``milestones``, ``gamma``, ``min_lr``. The
factories return an ``OptimizerRecipe`` whose ``lr_at(epoch, iteration, iters_per_epoch)`` is a pure
function, so resuming needs no scheduler state.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ibcore import BuildContext, Params, register_optimizer

# Sane ranges: a learning rate of 1e308 passes every type check and overflows in torch's first step.
MAX_LR = 1e4
MAX_WEIGHT_DECAY = 1e2
MAX_GAMMA = 1e4
MAX_EPOCHS = 100_000  # trainer.epochs' upper bound: warm-up and milestones count epochs


class ScheduledOptimizerParams(Params):
    """The learning rate, weight decay and schedule fields every built-in optimizer takes."""

    lr: float = Field(0.1, gt=0.0, le=MAX_LR, description="Base learning rate (reached at the end of warm-up).")
    weight_decay: float = Field(0.0, ge=0.0, le=MAX_WEIGHT_DECAY, description="L2 penalty (decoupled for adamw).")
    no_weight_decay_on_bias_and_norm: bool = Field(
        False, description="Put parameters with ndim <= 1 (biases, BatchNorm weights) in a group with weight_decay 0."
    )
    schedule: Literal["multistep", "cosine", "constant"] = Field(
        "multistep", description="Decay after warm-up: multiply by gamma at milestones, cosine to min_lr, or none."
    )
    warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="Number of linear warm-up epochs (0 = none).")
    warmup_start_factor: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="null: lr·(e+1)/W (LDAM-DRW); s: lr·(s + (1-s)·e/W) (BagofTricks-LT WarmupMultiStepLR).",
    )
    warmup_per_iteration: bool = Field(False, description="Raise the warm-up rate every step instead of every epoch.")
    milestones: list[int] = Field(
        default_factory=list,
        description="Epoch counts after which lr is multiplied by gamma (multistep): 160 = from the 161st epoch.",
    )
    gamma: float = Field(
        0.1, gt=0.0, le=MAX_GAMMA, description="Multiplier applied at each milestone reached (multistep)."
    )
    min_lr: float = Field(0.0, ge=0.0, le=MAX_LR, description="Floor the cosine schedule decays to at the last epoch.")

    @field_validator("milestones")
    @classmethod
    def _increasing_milestones(cls, milestones: list[int], info: ValidationInfo) -> list[int]:
        if any(m < 0 or m > MAX_EPOCHS for m in milestones):
            raise ValueError(f"milestones must be epochs from 0 to {MAX_EPOCHS}, got {milestones}")
        if any(b <= a for a, b in pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        if milestones and info.data.get("schedule", "multistep") != "multistep":
            raise ValueError(f"milestones only apply to schedule 'multistep', not {info.data.get('schedule')!r}")
        return milestones

    @field_validator("min_lr")
    @classmethod
    def _floor_below_lr(cls, min_lr: float, info: ValidationInfo) -> float:
        # lr is declared (and so validated) before min_lr, also where a subclass overrides its default.
        lr = info.data.get("lr")
        if info.data.get("schedule") == "cosine" and lr is not None and min_lr > lr:
            raise ValueError(f"min_lr ({min_lr}) must not exceed lr ({lr})")
        return min_lr


class SGDParams(ScheduledOptimizerParams):
    lr: float = Field(0.1, gt=0.0, le=MAX_LR, description="Base learning rate (reached at the end of warm-up).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum factor.")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(
        2e-4,
        ge=0.0,
        le=MAX_WEIGHT_DECAY,
        description="L2 penalty; 2e-4 is the LDAM-DRW / BagofTricks-LT CIFAR value.",
    )

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        if nesterov and info.data.get("momentum", 0.0) <= 0.0:
            raise ValueError("nesterov momentum needs momentum > 0")
        return nesterov


class AdamParams(ScheduledOptimizerParams):
    lr: float = Field(1e-3, gt=0.0, le=MAX_LR, description="Base learning rate (reached at the end of warm-up).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Decay rates of the first and second moments.")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="Added to the denominator for numerical stability.")
    weight_decay: float = Field(
        0.0, ge=0.0, le=MAX_WEIGHT_DECAY, description="L2 penalty added to the gradient (coupled)."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(betas)}")
        return betas


class AdamWParams(AdamParams):
    weight_decay: float = Field(
        1e-2, ge=0.0, le=MAX_WEIGHT_DECAY, description="Decoupled weight decay (torch's AdamW default 0.01)."
    )


def _build_schedule(params: ScheduledOptimizerParams, context: BuildContext, component: str) -> Any:
    from ib_plugins_builtin.optimizers._schedule import Schedule

    if params.schedule == "cosine":
        context.require(component, "epochs")
    return Schedule(
        base_lr=params.lr,
        kind=params.schedule,
        warmup_epochs=params.warmup_epochs,
        warmup_start_factor=params.warmup_start_factor,
        warmup_per_iteration=params.warmup_per_iteration,
        milestones=tuple(params.milestones),
        gamma=params.gamma,
        min_lr=params.min_lr,
        total_epochs=context.epochs,
    )


@register_optimizer("sgd", SGDParams)
def build_sgd(params: SGDParams, context: BuildContext) -> Any:
    """Stochastic gradient descent with (Nesterov) momentum, L2 weight decay and an epoch-based LR schedule."""
    import torch

    from ib_plugins_builtin.optimizers._recipe import OptimizerRecipe

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            groups, lr=params.lr, momentum=params.momentum, nesterov=params.nesterov, weight_decay=params.weight_decay
        )

    return OptimizerRecipe("sgd", params, _build_schedule(params, context, "optimizer 'sgd'"), make)


@register_optimizer("adam", AdamParams, citation="Kingma & Ba, ICLR 2015, 'Adam: A Method for Stochastic Optimization'")
def build_adam(params: AdamParams, context: BuildContext) -> Any:
    """Adam with coupled L2 weight decay and an epoch-based LR schedule."""
    import torch

    from ib_plugins_builtin.optimizers._recipe import OptimizerRecipe

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            groups, lr=params.lr, betas=params.betas, eps=params.eps, weight_decay=params.weight_decay
        )

    return OptimizerRecipe("adam", params, _build_schedule(params, context, "optimizer 'adam'"), make)


@register_optimizer(
    "adamw", AdamWParams, citation="Loshchilov & Hutter, ICLR 2019, 'Decoupled Weight Decay Regularization'"
)
def build_adamw(params: AdamWParams, context: BuildContext) -> Any:
    """AdamW: Adam with decoupled weight decay and an epoch-based LR schedule."""
    import torch

    from ib_plugins_builtin.optimizers._recipe import OptimizerRecipe

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            groups, lr=params.lr, betas=params.betas, eps=params.eps, weight_decay=params.weight_decay
        )

    return OptimizerRecipe("adamw", params, _build_schedule(params, context, "optimizer 'adamw'"), make)


__all__ = ["AdamParams", "AdamWParams", "SGDParams", "ScheduledOptimizerParams"]
