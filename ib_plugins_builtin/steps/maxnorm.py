"""Weight balancing's MaxNorm step (Alshammari et al., CVPR 2022, "Long-Tailed Recognition via Weight Balancing").

The standard step (forward, the run's loss, backward, one optimizer step), then MaxNorm by projected gradient
descent: every class's row of the classifier weight whose Lp norm exceeds a threshold is scaled back onto it.
The projection is the official ``MaxNorm_via_PGD`` (ShadeAlsha/LTR-weight-balancing, ``utils/regularizers.py``):

- it acts on the classifier's weight rows only; the official code passes the bias too, with an infinite
  threshold, so the bias is never changed;
- ``thresh`` is relative by default: the threshold is ``min + thresh * (max - min)`` of the row norms at the
  moment it is fixed (``setPerLayerThresh``), here before the first optimizer step the step takes with the
  run's current optimizer (the run's start, or a stage that brings a new optimizer, as in weight balancing's
  second stage); ``thresh_mode: absolute`` makes ``thresh`` the radius itself;
- a row is over when ``norm ** tau > threshold`` and is then multiplied by ``threshold / (norm ** tau) ** tau``
  (the official arithmetic; with ``tau`` other than 1 the norm is raised to ``tau`` twice, as there).

The paper projects after every iteration (its page 4; the authors confirm it in the official repository's
issue #5); the official demo projects once per epoch. This step projects after every optimizer step.

Importing this module does not import torch: the step imports it when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ibcore import BuildContext, Params, TrainingError, register_step

if TYPE_CHECKING:
    from torch import Tensor

    from ibcore.protocols import Batch, StepRun

CITATION = (
    "Alshammari, Wang, Ramanan & Kong, CVPR 2022, 'Long-Tailed Recognition via Weight Balancing' "
    "(official code ShadeAlsha/LTR-weight-balancing, utils/regularizers.py MaxNorm_via_PGD)"
)


class MaxNormParams(Params):
    """The official ``MaxNorm_via_PGD(thresh, LpNorm, tau)``, and whether ``thresh`` is relative (official)."""

    thresh_mode: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative (official): the threshold is min + thresh * (max - min) of the classifier's row "
        "norms when the run's current optimizer takes its first step; absolute: thresh is the radius itself",
    )
    thresh: float = Field(
        0.1,
        ge=0.0,
        description="the MaxNorm threshold; relative: a fraction in [0, 1] (0.1, the official second stage on "
        "CIFAR-100-LT; the official class default is 1.0), absolute: the largest row norm allowed (> 0)",
    )
    lp_norm: float = Field(2.0, ge=1.0, description="p of the Lp norm of each class's weight row (official LpNorm)")
    tau: float = Field(
        1.0,
        gt=0.0,
        description="official tau: a row is over when norm**tau > threshold, then scaled by "
        "threshold / (norm**tau)**tau; 1 is the true projection onto the norm ball",
    )

    @field_validator("thresh")
    @classmethod
    def _thresh_fits_its_mode(cls, thresh: float, info: ValidationInfo) -> float:
        mode = info.data.get("thresh_mode", "relative")
        if mode == "relative" and thresh > 1.0:
            raise ValueError(
                f"a relative thresh is a fraction of the way from the smallest to the largest row norm, in [0, 1]; "
                f"got {thresh} (for a radius, set thresh_mode: absolute)"
            )
        if mode == "absolute" and thresh <= 0.0:
            raise ValueError(f"an absolute thresh is the largest row norm allowed and must be > 0, got {thresh}")
        return thresh


def classifier_weight(run: StepRun) -> Tensor:
    """The run's classifier weight, one row per class (what MaxNorm projects)."""
    import torch

    classifier = getattr(run.model, "classifier", None)
    weight = getattr(classifier, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise TrainingError(
            f"run {run.name!r}: the step 'maxnorm' projects the rows of the classifier's weight, one per class, "
            f"but the backbone's classifier ({type(classifier).__name__}) has no weight matrix; use a backbone "
            "whose `classifier` is a linear layer"
        )
    return weight


def row_norms(weight: Tensor, lp_norm: float) -> Tensor:
    """The Lp norm of each class's row, (num_classes,) (official: ``torch.linalg.norm(W, ord=p, dim=1)``)."""
    import torch

    return torch.linalg.vector_norm(weight.detach().reshape(weight.shape[0], -1), ord=lp_norm, dim=1)


def relative_threshold(weight: Tensor, thresh: float, lp_norm: float) -> Tensor:
    """Official ``setPerLayerThresh``: ``min + thresh * (max - min)`` of the row norms (no ``tau`` there)."""
    norms = row_norms(weight, lp_norm)
    return norms.min() + thresh * (norms.max() - norms.min())


def project_rows(weight: Tensor, threshold: Tensor | float, lp_norm: float = 2.0, tau: float = 1.0) -> None:
    """Official ``PGD``, in place: rows with ``norm**tau > threshold`` scaled by ``threshold / (norm**tau)**tau``.

    Written with ``torch.where`` instead of boolean indexing, so it needs no host sync; the arithmetic of each
    row is the official one.
    """
    import torch

    with torch.no_grad():
        powered = row_norms(weight, lp_norm) ** tau
        over = powered > threshold
        scale = torch.where(over, threshold / powered**tau, torch.ones_like(powered))
        weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))


class MaxNormStep:
    """The standard step, then each run's classifier rows projected into the MaxNorm ball.

    ``thresholds[run]`` is the threshold in force for each run (a 0-d tensor on the run's device). A relative
    threshold is fixed from the row norms before the first optimizer step taken with the run's current
    optimizer, so a stage that creates a new optimizer (weight balancing's classifier stage) fixes a new one
    from the weights it starts with.
    """

    def __init__(self, params: MaxNormParams) -> None:
        from ibcore.engine.steps.standard import StandardStep

        self.params = params
        self.thresholds: dict[str, Tensor] = {}
        self._standard = StandardStep()
        self._fixed_for: dict[str, Any] = {}  # run name -> the optimizer its threshold was fixed for

    def threshold_for(self, run: StepRun) -> Tensor:
        """The run's threshold, fixed now if the run has a new optimizer (or has never been seen)."""
        import torch

        if self._fixed_for.get(run.name) is not run.optimizer:
            weight = classifier_weight(run)
            p = self.params
            if p.thresh_mode == "relative":
                threshold = relative_threshold(weight, p.thresh, p.lp_norm)
            else:
                threshold = torch.tensor(p.thresh, dtype=weight.dtype, device=weight.device)
            self.thresholds[run.name] = threshold
            self._fixed_for[run.name] = run.optimizer
        return self.thresholds[run.name]

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        thresholds = {run.name: self.threshold_for(run) for run in runs}
        losses = self._standard(runs, batches)
        for run in runs:
            project_rows(classifier_weight(run), thresholds[run.name], self.params.lp_norm, self.params.tau)
        return losses


@register_step("maxnorm", MaxNormParams, citation=CITATION)
def build_maxnorm(params: MaxNormParams, context: BuildContext) -> MaxNormStep:
    """Weight balancing's MaxNorm: the standard step, then each class's classifier row projected into a norm ball."""
    return MaxNormStep(params)


__all__ = ["CITATION", "MaxNormParams", "MaxNormStep", "build_maxnorm", "project_rows", "relative_threshold"]
