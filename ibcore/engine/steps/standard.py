"""The standard training step: forward, the run's (mixed) loss, backward, one optimizer step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ibcore.engine.mixing import full_precision, loss_of
from ibcore.protocols import Batch, StepRun


def run_loss(run: StepRun, x: Tensor, y: Tensor) -> Tensor:
    """The run's loss on one batch, with its mixer's plan when it mixes (inputs or a hidden layer).

    The building block of every step: a step that needs two passes (SAM) calls it twice.
    """
    plan = run.mix_plan(x, y)
    with run.autocast():
        if plan is None:
            logits = run.forward(x)
        elif plan.layer == 0:
            assert run.mixer is not None
            logits = run.forward(run.mixer.mix(x, plan))
        else:
            mixer = run.mixer
            assert mixer is not None
            logits = run.forward(x, plan.layer, lambda h: mixer.mix(h, plan))
        return loss_of(run.loss, full_precision(logits), y, plan)


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
