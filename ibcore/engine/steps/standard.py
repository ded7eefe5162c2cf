"""The standard training step: forward, the run's (mixed) loss, backward, one optimizer step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ibcore.engine.mixing import full_precision, loss_of
from ibcore.errors import TrainingError
from ibcore.protocols import Batch, MixPlan, StepRun


def run_loss(run: StepRun, x: Tensor, y: Tensor) -> Tensor:
    """The run's loss on one batch, with its mixer's plan when it mixes (inputs or a hidden layer).

    The building block of every step. A step with two passes (SAM) draws the plan once (``run.mix_plan``) and
    calls :func:`planned_loss` twice with it.
    """
    return planned_loss(run, x, y, run.mix_plan(x, y))


def planned_loss(run: StepRun, x: Tensor, y: Tensor, plan: MixPlan | None) -> Tensor:
    """The run's (mixed) loss on one batch with a given plan (None: no mixing)."""
    with run.autocast():
        return loss_of(run.loss, planned_logits(run, x, plan), y, plan)


def planned_logits(run: StepRun, x: Tensor, plan: MixPlan | None) -> Tensor:
    """The run's full-precision logits on ``x`` mixed by ``plan`` (inputs or a hidden layer); call it inside
    ``run.autocast()``."""
    if plan is None:
        return full_precision(run.forward(x))
    mixer = run.mixer
    if mixer is None:
        raise TrainingError(f"run {run.name!r}: a mixer plan was drawn but the run has no mixer")
    if plan.layer == 0:
        return full_precision(run.forward(mixer.mix(x, plan)))
    return full_precision(run.forward(x, plan.layer, lambda h: mixer.mix(h, plan)))


class StandardStep:
    """One optimisation step of each run, one run after another: the reference every other path is tested
    against."""

    fusable = True  # the fused step computes exactly this, stacked

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        losses = {}
        for run in runs:
            batch = batches[run.name]
            loss = run_loss(run, batch.inputs, batch.targets)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            losses[run.name] = loss.detach()
        return losses
