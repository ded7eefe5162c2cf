"""RIDE's training step (Wang et al., ICLR 2021): every expert's distribution-aware loss plus the diversity term.

Follows ``RIDELoss`` of the official code (frank-xwang/RIDE-LongTailRecognition @ ab8be5c, ``model/loss.py``):
for each expert ``e`` with logits ``z_e`` and the model's logits ``z`` (the experts' mean),

    loss += base_loss_factor * CE(LDAM(z_e), y, weight=w_base)
    loss += additional_diversity_factor * mean(T)^2 * KL(softmax(z / T) || softmax(z_e / T))  [batchmean]

where ``LDAM`` subtracts ``s * m_y`` from the true class's logit (m_c proportional to n_c^(-1/4), largest
``max_m``), ``T`` is ``base_diversity_temperature`` times a per-class factor and ``softmax(z / T)`` carries no
gradient. Before the deferred re-weighting ``w_base`` is none and ``T`` is the base temperature; once it is on
(from ``reweight_epoch`` completed epochs, the official ``epoch > reweight_epoch`` with 1-based epochs, or
throughout with ``reweight: true``), ``w_base`` is the class-balanced weight (beta 0.9999, summing to C) and
``T_c`` is proportional to ``C * reweight_factor * n_c / N + 1 - reweight_factor``, scaled so the largest is the
base temperature.

Left out: the expert router (the "expert assignment" stage) and distillation from a teacher. The step needs a
multi-expert backbone (``ride_resnet32``); it ignores the run's ``loss`` and refuses a mixer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from ibcore import BuildContext, ConfigError, ConfigIssue, ContextError, Params, register_step

if TYPE_CHECKING:
    from torch import Tensor

    from ibcore.protocols import Batch, StepRun

RIDE_CITATION = "Wang et al., ICLR 2021, 'Long-tailed Recognition by Routing Diverse Distribution-Aware Experts'"
EFFECTIVE_NUMBER_BETA = 0.9999  # hard-coded in the official RIDELoss (betas = [0, 0.9999], idx = 1)


class RideParams(Params):
    """Params of the ``ride`` step: the official ``RIDELoss`` arguments, with its defaults."""

    max_m: float = Field(0.5, gt=0, description="LDAM margin of the rarest class (m_c proportional to n_c^-1/4)")
    s: float = Field(
        30.0, gt=0, description="the margin is s * m_y in logit units (official s=30: the backbone's cosine scale)"
    )
    base_loss_factor: float = Field(1.0, ge=0, description="weight of each expert's LDAM cross-entropy")
    additional_diversity_factor: float = Field(
        -0.2,
        description="weight of each expert's KL divergence from the mean prediction; negative rewards diversity "
        "(RIDELoss default -0.2; the official CIFAR-100-LT config uses -0.45). At exactly 0 the official code "
        "trains every expert's LDAM term on the mean logits instead (kept here)",
    )
    base_diversity_temperature: float = Field(1.0, gt=0, description="temperature T of the diversity term")
    reweight_epoch: int | None = Field(
        None,
        ge=0,
        description="deferred re-weighting (class-balanced weights, beta 0.9999, in the LDAM term; per-class "
        "temperatures in the diversity term) from this many completed epochs on: the official CIFAR config's "
        "reweight_epoch 160 re-weights from the 161st epoch. null: no re-weighting unless `reweight`",
    )
    reweight: bool = Field(
        False,
        description="re-weight in every epoch this step trains (for a stage that switches it on; `reweight_epoch` "
        "does the same without one)",
    )
    reweight_factor: float = Field(
        0.05, ge=0, description="how much the per-class diversity temperatures follow the class frequencies"
    )

    @model_validator(mode="after")
    def _one_switch(self) -> RideParams:
        if self.reweight and self.reweight_epoch is not None:
            raise ValueError("set either reweight (always on) or reweight_epoch (on from that epoch), not both")
        return self


@register_step("ride", RideParams, citation=RIDE_CITATION)
def build_ride(params: RideParams, context: BuildContext) -> RideStep:
    """RIDE's loss over all experts (LDAM-DRW per expert + diversity KL); no router, no distillation."""
    counts = _class_counts(context)
    return RideStep(params, counts)


def _class_counts(context: BuildContext) -> list[int]:
    component = "step 'ride'"
    context.require(component, "class_counts")
    counts = [int(n) for n in context.class_counts or ()]
    if not counts or (context.num_classes is not None and len(counts) != context.num_classes):
        raise ContextError(
            f"{component}: class_counts has {len(counts)} entries but num_classes is {context.num_classes}."
        )
    empty = [index for index, n in enumerate(counts) if n <= 0]
    if empty:
        raise ContextError(
            f"{component} needs at least one training sample per class (LDAM margins are n_c^-1/4); "
            f"class {empty[0]} has {counts[empty[0]]}."
        )
    return counts


def ldam_margins(counts: Sequence[int], max_m: float) -> list[float]:
    """m_c = n_c^(-1/4), rescaled so the largest is ``max_m`` (the official ``m_list``), float64."""
    raw = [1.0 / math.sqrt(math.sqrt(n)) for n in counts]
    top = max(raw)
    return [m * (max_m / top) for m in raw]


def class_balanced_weights(counts: Sequence[int], beta: float = EFFECTIVE_NUMBER_BETA) -> list[float]:
    """(1 - beta) / (1 - beta^n_c), normalised to sum to C (the official ``per_cls_weights_enabled``)."""
    raw = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    total = sum(raw)
    return [w / total * len(counts) for w in raw]


def diversity_weights(counts: Sequence[int], reweight_factor: float) -> list[float]:
    """C * f_c * r + 1 - r with f_c = n_c / N, divided by its maximum (``per_cls_weights_enabled_diversity``)."""
    total = sum(counts)
    raw = [len(counts) * (n / total) * reweight_factor + 1.0 - reweight_factor for n in counts]
    top = max(raw)
    return [w / top for w in raw]


class RideStep:
    """Per run: forward through ``run.forward`` recording the expert logits, RIDE's loss, backward, optimizer step.

    Not ``fusable``: the fused path trains the standard step's arithmetic only, so each run of this step trains
    on its own.
    """

    def __init__(self, params: RideParams, class_counts: Sequence[int]) -> None:
        import torch

        self.params = params
        self.class_counts = tuple(class_counts)
        self.num_classes = len(class_counts)
        diversity = diversity_weights(class_counts, params.reweight_factor)
        if min(diversity) <= 0:
            raise ConfigError(
                [
                    ConfigIssue(
                        "params.reweight_factor",
                        f"step 'ride': reweight_factor {params.reweight_factor} makes a class's diversity "
                        "temperature non-positive; use a smaller one",
                    )
                ]
            )
        # float32, as the official buffers; moved to the logits' device (and dtype) when used.
        self._margins = torch.tensor(ldam_margins(class_counts, params.max_m), dtype=torch.float32)
        self._base_weights = torch.tensor(class_balanced_weights(class_counts), dtype=torch.float32)
        self._temperature = params.base_diversity_temperature * torch.tensor(diversity, dtype=torch.float32).view(1, -1)
        self._temperature_mean = float(self._temperature.mean().item())  # the official .item(), once
        self._on: dict[tuple[Any, Any], tuple[Tensor, Tensor, Tensor]] = {}

    def reweights_in(self, epoch: int | None) -> bool:
        """Whether the deferred re-weighting is on in the 0-based ``epoch`` (None: the step's view has no epoch)."""
        if self.params.reweight or self.params.reweight_epoch is None:
            return self.params.reweight
        if epoch is None:
            raise ConfigError(
                [
                    ConfigIssue(
                        "params.reweight_epoch",
                        "step 'ride' needs the epoch from its StepRun view (run.epoch), which this engine does "
                        "not give: switch the re-weighting on with a stage "
                        "(`step: {name: ride, params: {reweight: true}}`)",
                    )
                ]
            )
        return epoch >= self.params.reweight_epoch  # the official epoch > reweight_epoch, 1-based

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = tuple(  # type: ignore[assignment]
                t.to(device=like.device, dtype=like.dtype)
                for t in (self._margins, self._base_weights, self._temperature)
            )
        return self._on[key]

    def loss(self, logits: Tensor, expert_logits: Tensor, targets: Tensor, reweight: bool | None = None) -> Tensor:
        """RIDELoss: ``logits`` (N, C) the model's (mean) logits, ``expert_logits`` (E, N, C), ``targets`` (N,);
        ``reweight`` says whether the deferred re-weighting is on (default: the ``reweight`` param)."""
        import torch
        import torch.nn.functional as F

        params = self.params
        reweight = params.reweight if reweight is None else reweight
        if expert_logits.dim() != 3 or expert_logits.shape[1:] != logits.shape:
            raise ValueError(
                f"step 'ride': expert logits of shape {tuple(expert_logits.shape)} do not match the model's logits "
                f"{tuple(logits.shape)} (expected (experts, N, C))"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"step 'ride': the model gives {logits.shape[1]} logits but class_counts has {self.num_classes} classes"
            )
        margins, weights, temperatures = self._constants(logits)
        base_weights = weights if reweight else None
        temperature_or_base = temperatures if reweight else params.base_diversity_temperature
        temperature_mean = self._temperature_mean if reweight else params.base_diversity_temperature
        true_class = F.one_hot(targets, self.num_classes).bool()
        shift = (margins[targets] * params.s).unsqueeze(1)
        factor = params.additional_diversity_factor * temperature_mean * temperature_mean
        with torch.no_grad():
            mean_distribution = F.softmax(logits / temperature_or_base, dim=1)
        total: Tensor | float = 0.0
        for expert in expert_logits:
            # The official code trains each expert's LDAM term on the mean logits when the diversity factor is 0.
            base_logits = logits if params.additional_diversity_factor == 0 else expert
            margined = torch.where(true_class, base_logits - shift, base_logits)
            total = total + params.base_loss_factor * F.cross_entropy(margined, targets, weight=base_weights)
            expert_distribution = F.log_softmax(expert / temperature_or_base, dim=1)
            total = total + factor * F.kl_div(expert_distribution, mean_distribution, reduction="batchmean")
        assert not isinstance(total, float)  # at least one expert
        return total

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        from ibcore.engine.mixing import full_precision

        losses = {}
        for run in runs:
            batch = batches[run.name]
            record = _recorder(run)
            with run.autocast(), record() as recorded:
                logits = run.forward(batch.inputs)
            if len(recorded) != 1:
                raise RuntimeError(
                    f"step 'ride', run {run.name!r}: expected one recorded set of expert logits from the forward "
                    f"pass, got {len(recorded)}"
                )
            reweight = self.reweights_in(getattr(run, "epoch", None))
            loss = self.loss(full_precision(logits), full_precision(recorded[0]), batch.targets, reweight)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            losses[run.name] = loss.detach()
        return losses


def _recorder(run: StepRun) -> Any:
    """The model's ``recording_expert_logits``, or a ConfigError saying what the step needs."""
    if run.mixer is not None:
        raise ConfigError(
            [
                ConfigIssue(
                    "mixer",
                    f"run {run.name!r}: step 'ride' does not mix (the official RIDE loss has no mixup); remove the "
                    "run's mixer",
                )
            ]
        )
    record = getattr(run.model, "recording_expert_logits", None)
    if not callable(record):
        raise ConfigError(
            [
                ConfigIssue(
                    "backbone",
                    f"run {run.name!r}: step 'ride' needs a multi-expert backbone that records its experts' logits "
                    f"(ride_resnet32); {type(run.model).__name__} does not",
                )
            ]
        )
    return record


__all__ = ["RideParams", "RideStep", "build_ride"]
