"""Sharpness-aware training steps: ``sam`` (SAM/ASAM) and ``imbsam`` (ImbSAM, SAM on the tail classes only).

Both take two forward/backward passes per batch: a gradient at the weights ``w``, an ascent to ``w + e``
with ``||e|| = rho``, a gradient there, back to ``w``, and one step of the run's own optimizer (so weight
decay, momentum and the LR schedule are the run's). Both passes use ONE draw of the run's mixer plan, and
BatchNorm running statistics are updated by the first pass only. Importing this module never imports
torch; the steps import it when they run.

References (docs/components/step_sam.md lists the differences from each):

- SAM: Foret et al., ICLR 2021; github.com/davda54/sam (``sam.py``, ``example/train.py``,
  ``example/utility/bypass_bn.py``) at 3c3afdbd71cff2462ec91c734b3d1170bd0f3707.
- ImbSAM: Zhou et al., ICCV 2023; github.com/cool-xuan/Imbalanced_SAM (``imbsam.py``,
  ``utils/trainval.py`` ``forbackward``, ``scripts/train.py``) at c65f41eb6ea54d06846180e2eff70abdfed886db.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pydantic import Field

from ibcore import BuildContext, BuildError, Params, TrainingError, register_step

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ibcore.protocols import Batch, Loss, MixPlan, StepRun

SAM_CITATION = (
    "Foret et al., ICLR 2021, 'Sharpness-Aware Minimization for Efficiently Improving Generalization' "
    "(PyTorch reference code davda54/sam, sam.py)"
)
IMBSAM_CITATION = (
    "Zhou et al., ICCV 2023, 'ImbSAM: A Closer Look at Sharpness-Aware Minimization in Class-Imbalanced "
    "Recognition' (official code cool-xuan/Imbalanced_SAM, imbsam.py and utils/trainval.py)"
)

SAM_EPSILON = 1e-12  # davda54/sam: rho / (||g|| + 1e-12)
IMBSAM_EPSILON = 1e-16  # Imbalanced_SAM/imbsam.py: rho / (||g|| + 1e-16)


class SAMParams(Params):
    """Params of the ``sam`` step (defaults: davda54/sam's ``SAM(rho=0.05, adaptive=False)``)."""

    rho: float = Field(
        0.05,
        gt=0.0,
        description="radius of the weight perturbation (davda54's default 0.05; ASAM needs a larger one, "
        "davda54's example uses 2.0)",
    )
    adaptive: bool = Field(
        False, description="ASAM (Kwon et al., ICML 2021): perturbation scaled elementwise by |w|, as davda54 does"
    )


class ImbSAMParams(Params):
    """Params of the ``imbsam`` step (defaults: the official CIFAR-100-LT script, ``scripts/train.py``)."""

    rho: float = Field(0.05, gt=0.0, description="radius of the tail-loss perturbation (official --rho 0.05)")
    tail_threshold: int = Field(
        20,
        ge=1,
        description="classes with fewer training images than this are tail (official --eta 20: the 'few' "
        "classes of CIFAR-100-LT)",
    )
    tail_weight: float = Field(
        2.0,
        gt=0.0,
        description="factor on the tail loss in the update (the official code's '* 2'); 1 is the plain sum of "
        "head and tail losses",
    )


@register_step("sam", SAMParams, citation=SAM_CITATION)
def build_sam(params: SAMParams, context: BuildContext) -> SAMStep:
    """Sharpness-Aware Minimization: the gradient at w + rho * g/||g|| (ASAM with adaptive), one optimizer step."""
    return SAMStep(rho=params.rho, adaptive=params.adaptive)


@register_step("imbsam", ImbSAMParams, citation=IMBSAM_CITATION)
def build_imbsam(params: ImbSAMParams, context: BuildContext) -> ImbSAMStep:
    """ImbSAM: head-class loss at w plus tail-class loss at the tail-sharpness ascent point, one optimizer step."""
    if context.class_counts is not None and not tail_classes(context.class_counts, params.tail_threshold):
        raise BuildError(no_tail_message(context.class_counts, params.tail_threshold))
    return ImbSAMStep(rho=params.rho, tail_threshold=params.tail_threshold, tail_weight=params.tail_weight)


# --------------------------------------------------------------------------------------------
# The steps


class SAMStep:
    """SAM (Foret et al., ICLR 2021) as davda54/sam computes it, with the run's optimizer as base optimizer.

    Per run: the (mixed) loss at w, backward; ``e = rho * g / (||g|| + 1e-12)`` over the optimizer's
    parameters that have a gradient (adaptive: ``e = rho * w^2 g / (||w g|| + 1e-12)``, ASAM); w += e;
    the loss at w + e with the SAME mixer plan and BatchNorm running statistics frozen (davda54's
    ``disable_running_stats``), backward; back to w; ``run.optimizer.step()`` with that second gradient.

    Returns each run's FIRST-pass loss (at w), as davda54's example logs it: comparable with the other
    runs' losses, not the sharpness-aware loss at w + e.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False) -> None:
        self.rho = rho
        self.adaptive = adaptive

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        losses = {}
        for run in runs:
            x, y = batches[run.name].inputs, batches[run.name].targets
            plan = run.mix_plan(x, y)  # one draw, both passes
            loss = planned_loss(run, x, y, plan)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            saved = ascend(run.optimizer, self.rho, adaptive=self.adaptive, epsilon=SAM_EPSILON)
            run.optimizer.zero_grad(set_to_none=True)
            with running_stats_frozen(run.model):
                planned_loss(run, x, y, plan).backward()
            restore(saved)
            run.optimizer.step()
            losses[run.name] = loss.detach()
        return losses


class ImbSAMStep:
    """ImbSAM (Zhou et al., ICCV 2023) as the official code computes it (``utils/trainval.py``, ``imbsam.py``).

    Per run: one forward at w; the batch's loss split by label into head (classes with at least
    ``tail_threshold`` training images) and tail terms, each normalised by the whole batch as the run's
    loss normalises it (its ``sample_weight``); head gradient at w kept; ``e = rho * g_T / (||g_T|| +
    1e-16)`` from the tail gradient at w; the tail loss at w + e (whole-batch forward, SAME mixer plan,
    BatchNorm running statistics frozen), backward; back to w; gradient = head gradient at w +
    ``tail_weight`` x tail gradient at w + e; one ``run.optimizer.step()``.

    Returns each run's loss at w (head + tail, unweighted): the run's ordinary loss, comparable with the
    other runs'. The official code logs head(w) + 2 x tail(w + e) instead.
    """

    def __init__(self, rho: float = 0.05, tail_threshold: int = 20, tail_weight: float = 2.0) -> None:
        self.rho = rho
        self.tail_threshold = tail_threshold
        self.tail_weight = tail_weight
        self._masks: dict[tuple[tuple[int, ...], str], Tensor] = {}

    def tail_mask(self, run: StepRun, device: torch.device) -> Tensor:
        """(C,) bool: which classes of ``run`` are tail, from its build context's class counts (cached)."""
        import torch

        run.context.require("step 'imbsam'", "class_counts")
        counts = tuple(run.context.class_counts or ())
        key = (counts, str(device))
        mask = self._masks.get(key)
        if mask is None:
            if not tail_classes(counts, self.tail_threshold):
                raise TrainingError(f"run {run.name!r}: " + no_tail_message(counts, self.tail_threshold))
            mask = torch.tensor([n < self.tail_threshold for n in counts], dtype=torch.bool, device=device)
            self._masks[key] = mask
        return mask

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        import torch

        losses = {}
        for run in runs:
            x, y = batches[run.name].inputs, batches[run.name].targets
            tail = self.tail_mask(run, y.device)
            plan = run.mix_plan(x, y)  # one draw, both passes
            with run.autocast():
                logits = planned_logits(run, x, plan)
                head_loss = masked_loss(run.loss, logits, y, plan, ~tail)
                tail_loss = masked_loss(run.loss, logits, y, plan, tail)
            params = [p for p in trainable(run.optimizer) if p.requires_grad]
            # The tail gradient at w only steers the ascent: autograd.grad accumulates nothing into .grad,
            # so under data_parallel only the head backward (below) goes through DDP's gradient averaging.
            tail_grads = torch.autograd.grad(tail_loss * self.tail_weight, params, retain_graph=True, allow_unused=True)
            run.optimizer.zero_grad(set_to_none=True)
            head_loss.backward()
            head_grads = [(p, p.grad) for p in params]
            for p, g in zip(params, tail_grads, strict=True):
                p.grad = g
            saved = ascend(run.optimizer, self.rho, adaptive=False, epsilon=IMBSAM_EPSILON)
            run.optimizer.zero_grad(set_to_none=True)
            with running_stats_frozen(run.model):  # restored after the backward, which saved the buffers
                with run.autocast():
                    perturbed = masked_loss(run.loss, planned_logits(run, x, plan), y, plan, tail)
                (perturbed * self.tail_weight).backward()
            restore(saved)
            with torch.no_grad():
                for p, head in head_grads:
                    if head is None:
                        continue
                    if p.grad is None:
                        p.grad = head
                    else:
                        p.grad.add_(head)
            run.optimizer.step()
            losses[run.name] = (head_loss + tail_loss).detach()
        return losses


# --------------------------------------------------------------------------------------------
# Building blocks (public: a step plugin of a user's own may use them)


def planned_logits(run: StepRun, x: Tensor, plan: MixPlan | None) -> Tensor:
    """:func:`ibcore.engine.steps.standard.planned_logits` (imported when called: this module stays light)."""
    from ibcore.engine.steps.standard import planned_logits as logits

    return logits(run, x, plan)


def planned_loss(run: StepRun, x: Tensor, y: Tensor, plan: MixPlan | None) -> Tensor:
    """:func:`ibcore.engine.steps.standard.planned_loss`: ``run_loss`` with a plan drawn once by the caller."""
    from ibcore.engine.steps.standard import planned_loss as loss

    return loss(run, x, y, plan)


def masked_loss(loss: Loss, logits: Tensor, y: Tensor, plan: MixPlan | None, keep: Tensor) -> Tensor:
    """The terms of the run's (mixed) loss whose label is a class in ``keep`` ((C,) bool), with the loss's
    own normaliser: ``masked_loss(keep) + masked_loss(~keep)`` is the whole loss."""
    if plan is None:
        return loss(logits, y, keep[y].to(logits.dtype))
    weight = plan.target_weight
    own, partner = y, y[plan.permutation]
    return loss(logits, own, weight * keep[own]) + loss(logits, partner, (1.0 - weight) * keep[partner])


def trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters, in its order (SAM perturbs what the base optimizer updates)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def ascend(
    optimizer: torch.optim.Optimizer, rho: float, *, adaptive: bool, epsilon: float
) -> list[tuple[Tensor, Tensor]]:
    """Move each parameter with a gradient to ``w + e`` (davda54's ``first_step``); return (param, w) pairs.

    ``e = rho * g / (||g|| + epsilon)``, the norm over all those gradients; adaptive (ASAM):
    ``e = rho * w^2 g / (||w g|| + epsilon)``.
    """
    import torch

    pairs = [(p, p.grad) for p in trainable(optimizer) if p.grad is not None]
    if not pairs:
        return []
    with torch.no_grad():
        device = pairs[0][0].device
        # davda54 multiplies by 1.0 when not adaptive: exact, so leaving it out changes no bit
        norms = [(torch.abs(p) * g if adaptive else g).norm(p=2).to(device) for p, g in pairs]
        scale = rho / (torch.norm(torch.stack(norms), p=2) + epsilon)
        saved = []
        for p, g in pairs:
            saved.append((p, p.detach().clone()))
            p.add_((torch.pow(p, 2) * g if adaptive else g) * scale.to(p))
    return saved


def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    """Put each parameter back to the weights :func:`ascend` saved (in place: optimizer state stays attached)."""
    import torch

    with torch.no_grad():
        for p, w in saved:
            p.copy_(w)


@contextmanager
def running_stats_frozen(model: torch.nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but keep their running statistics unchanged.

    davda54's ``disable_running_stats`` sets the momentum to 0 for the second pass; restoring the buffers
    instead has the same effect and also keeps ``num_batches_tracked`` counting steps (davda54 counts two
    a step) and the statistics finite when the perturbed pass is not.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        restore(saved)


def tail_classes(class_counts: Sequence[int], threshold: int) -> list[int]:
    """The classes with fewer than ``threshold`` training images (the official code's ``count < eta``)."""
    return [c for c, n in enumerate(class_counts) if n < threshold]


def no_tail_message(class_counts: Sequence[int], threshold: int) -> str:
    return (
        f"imbsam: tail_threshold={threshold} makes no class a tail class (the smallest class has "
        f"{min(class_counts, default=0)} training images), so ImbSAM would be the standard step; set "
        "tail_threshold above the smallest class count, or use step 'standard' or 'sam'."
    )


__all__ = [
    "IMBSAM_CITATION",
    "SAM_CITATION",
    "ImbSAMParams",
    "ImbSAMStep",
    "SAMParams",
    "SAMStep",
    "ascend",
    "build_imbsam",
    "build_sam",
    "masked_loss",
    "planned_logits",
    "planned_loss",
    "restore",
    "running_stats_frozen",
    "tail_classes",
    "trainable",
]
