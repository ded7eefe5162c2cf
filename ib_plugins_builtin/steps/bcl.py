"""BCL's training step (Zhu et al., CVPR 2022): the run's loss on the logits plus the balanced contrastive loss.

Follows the official training loop (FlamieZhu/Balanced-Contrastive-Learning @ f72d070, ``main.py`` ``train``,
``loss/contrastive.py`` ``BalSCL``, ``loss/logitadjust.py`` ``LogitAdjust``): every view of the batch goes
through the network in ONE forward pass (one BatchNorm batch), then

    loss = alpha * L_cls(logits of the classification view, y) + beta * BalSCL(projections of the two
           contrastive views, y, class centres)

where the official ``L_cls`` is ``LogitAdjust`` (cross-entropy on ``z + log pi``, tau = 1): here it is the run's
own ``loss`` (``logit_adjusted`` is the official one; any other loss is an ablation). ``BalSCL`` is a supervised
contrastive loss over the 2N projections and the C class centres (class-complement: every class is present in
every batch through its centre) whose denominator divides each other sample's term by the batch count of its
class (class-averaging).

Views: the official loop draws three views (one classification view, two contrastive views). With the run's
``views: [a]`` the classification view is the batch itself and the contrastive views are the batch and ``a``;
with ``views: [a, b]`` the classification view is the batch and the contrastive views are ``a`` and ``b`` (the
official layout). Any other count is refused. The step needs ``bcl_resnet32`` (or any backbone that records its
projection and class centres the same way) and refuses a mixer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from ibcore import BuildContext, ConfigError, ConfigIssue, ContextError, Params, TrainingError, register_step

if TYPE_CHECKING:
    from torch import Tensor

    from ibcore.protocols import Batch, StepRun

BCL_CITATION = (
    "Zhu et al., CVPR 2022, 'Balanced Contrastive Learning for Long-Tailed Visual Recognition' "
    "(official code FlamieZhu/Balanced-Contrastive-Learning, loss/contrastive.py and main.py)"
)

NO_VIEW_HINT = (
    "step 'bcl' contrasts two views of every sample, so the run needs an extra view: add "
    "`views: [{name: color_jitter}]` (or any policy other than the run's `augmentation`) to the run; "
    "`views: [a, b]` gives the official layout (the batch for the classification loss, a and b for the "
    "contrastive loss)"
)


class BCLParams(Params):
    """Params of the ``bcl`` step (defaults: the official ``main.py``: --alpha 1.0, --beta 0.35, --temp 0.07)."""

    alpha: float = Field(
        1.0, ge=0.0, description="weight of the classification loss, the run's `loss` (official --alpha 1.0)"
    )
    beta: float = Field(
        0.35,
        ge=0.0,
        description="weight of the balanced contrastive loss (official --beta 0.35, the ImageNet-LT default; the "
        "CIFAR setting reported for the paper is 0.6 with alpha 2.0)",
    )
    temperature: float = Field(
        0.07,
        gt=0.0,
        description="temperature of the contrastive logits (official --temp 0.07; BalSCL's own default and the "
        "CIFAR setting is 0.1)",
    )

    @model_validator(mode="after")
    def _something_to_learn(self) -> BCLParams:
        if self.alpha == 0.0 and self.beta == 0.0:
            raise ValueError("alpha and beta are both 0: the step would have no loss to train on")
        return self


@register_step("bcl", BCLParams, citation=BCL_CITATION)
def build_bcl(params: BCLParams, context: BuildContext) -> BCLStep:
    """BCL: alpha x the run's loss (official: logit-adjusted CE) + beta x the balanced contrastive loss of 2 views."""
    component = "step 'bcl'"
    context.require(component, "num_classes")
    num_classes = int(context.num_classes)  # type: ignore[arg-type]  # require() checked it is set
    if num_classes < 1:
        raise ContextError(f"{component} needs num_classes >= 1 in its BuildContext, got {num_classes}.")
    return BCLStep(params.alpha, params.beta, params.temperature, num_classes)


def balanced_contrastive_loss(features: Tensor, targets: Tensor, centres: Tensor, temperature: float) -> Tensor:
    """The official ``BalSCL(cls_num_list, temperature)(centres, features, targets)``.

    ``features`` (N, 2, D): the normalised projections of two views of N samples; ``targets`` (N,); ``centres``
    (C, D): the normalised class centres. Anchors are the 2N projections; the other 2N - 1 projections and the C
    centres are compared with each one. Positives share its label (the centre of its class always does); in the
    denominator, each term is divided by the number of projections and centres of its class in the batch (one
    less for a positive, as the official ``per_ins_weight = count - mask``). Vectorised: the official code loops
    in Python over the 2N + C labels.
    """
    import torch

    if features.dim() != 3 or features.shape[1] != 2:
        raise ValueError(f"balanced_contrastive_loss: features must be (N, 2, D), got {tuple(features.shape)}")
    n, num_classes = features.shape[0], centres.shape[0]
    labels = torch.cat([targets.view(-1), targets.view(-1), torch.arange(num_classes, device=targets.device)])
    anchors = torch.cat(torch.unbind(features, dim=1), dim=0)  # view 0 of every sample, then view 1
    logits = anchors.mm(torch.cat([anchors, centres], dim=0).T) / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # the official shift (cancels out)
    not_self = torch.ones_like(logits)
    not_self[torch.arange(2 * n, device=logits.device), torch.arange(2 * n, device=logits.device)] = 0
    positive = (labels[: 2 * n, None] == labels[None, :]).to(logits.dtype) * not_self
    class_count = torch.bincount(labels, minlength=num_classes).to(logits.dtype)
    per_term = class_count[labels].view(1, -1) - positive
    denominator = (torch.exp(logits) * not_self / per_term).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(denominator)
    mean_log_prob_pos = (positive * log_prob).sum(dim=1) / positive.sum(dim=1)
    return -mean_log_prob_pos.view(2, n).mean()


class BCLStep:
    """Per run: one forward of the batch and its views through ``run.forward``, the BCL loss, backward, one
    optimizer step. Returns the total loss ``alpha * L_cls + beta * L_BalSCL``.

    Not ``fusable``: each run of this step trains on its own, next to the runs the fused path stacks.
    """

    def __init__(self, alpha: float, beta: float, temperature: float, num_classes: int) -> None:
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.num_classes = num_classes

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        import torch

        from ibcore.engine.mixing import full_precision

        losses = {}
        for run in runs:
            batch = batches[run.name]
            x, y = batch.inputs, batch.targets
            n = len(y)
            record = _recorder(run, len(batch.views))
            with run.autocast():
                with record() as recorded:
                    logits = full_precision(run.forward(torch.cat([x, *batch.views], dim=0)))
                if len(recorded) != 1:
                    raise TrainingError(
                        f"step 'bcl', run {run.name!r}: expected one recorded projection from the forward pass, "
                        f"got {len(recorded)}"
                    )
                projection, centres = recorded[0]
                if centres.shape[0] != self.num_classes or logits.shape[1] != self.num_classes:
                    raise TrainingError(
                        f"step 'bcl', run {run.name!r}: the model gives {logits.shape[1]} logits and "
                        f"{centres.shape[0]} class centres, but the run has {self.num_classes} classes"
                    )
                classification = run.loss(logits[:n], y)
            first = 0 if len(batch.views) == 1 else n  # one view: (batch, view); two views: (view a, view b)
            pair = torch.stack([projection[first : first + n], projection[first + n : first + 2 * n]], dim=1)
            contrastive = balanced_contrastive_loss(full_precision(pair), y, full_precision(centres), self.temperature)
            loss = self.alpha * classification + self.beta * contrastive
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            losses[run.name] = loss.detach()
        return losses


def _recorder(run: StepRun, views: int) -> Any:
    """The model's ``recording_contrastive``, or an error saying what the step needs."""
    if views not in (1, 2):
        raise ConfigError(
            [
                ConfigIssue(
                    "views",
                    f"run {run.name!r}: "
                    + (NO_VIEW_HINT if views == 0 else f"step 'bcl' takes 1 or 2 extra views, the run has {views}"),
                )
            ]
        )
    if run.mixer is not None:
        raise ConfigError(
            [
                ConfigIssue(
                    "mixer",
                    f"run {run.name!r}: step 'bcl' does not mix (the official BCL has no mixup); remove the run's "
                    "mixer",
                )
            ]
        )
    record = getattr(run.model, "recording_contrastive", None)
    if not callable(record):
        raise ConfigError(
            [
                ConfigIssue(
                    "backbone",
                    f"run {run.name!r}: step 'bcl' needs a backbone with BCL's projection and class-centre heads "
                    f"(bcl_resnet32); {type(run.model).__name__} has none",
                )
            ]
        )
    return record


__all__ = ["BCL_CITATION", "BCLParams", "BCLStep", "balanced_contrastive_loss", "build_bcl"]
