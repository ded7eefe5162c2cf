"""LADE loss: params, per-class constants and registration (importing this never imports torch).

Hong et al., CVPR 2021, 'Disentangling Label Distribution for Long-tailed Visual Recognition';
official code github.com/hyperconnect/LADE (``loss/PriorCELoss.py``, ``loss/LADELoss.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from ib_plugins_builtin.losses.formulas import class_counts_for
from ib_plugins_builtin.losses.params import _LossParams
from ibcore import BuildContext, ContextError, register_loss

if TYPE_CHECKING:
    from torch import nn

LADE_CITATION = "Hong et al., CVPR 2021, 'Disentangling Label Distribution for Long-tailed Visual Recognition'"

# The official code adds this to a prior before its log (an empty class gets a large finite offset).
LADE_LOG_EPSILON = 1e-9


class LADEParams(_LossParams):
    alpha: float = Field(
        0.1,
        ge=0.0,
        description="Weight of the LADE regulariser added to the prior-shifted cross-entropy; 0 leaves LADE-CE alone.",
    )
    remine_lambda: float = Field(
        0.1, ge=0.0, description="Weight lambda of ReMINE's squared second term in the regulariser."
    )


def training_priors(class_counts: Sequence[int]) -> list[float]:
    """pi_c = n_c / sum(n), the training label distribution."""
    total = math.fsum(class_counts)
    return [n / total for n in class_counts]


def lade_log_prior(class_counts: Sequence[int]) -> list[float]:
    """log(pi_c + 1e-9), the shift of the official ``PriorCELoss`` and ``LADELoss``."""
    return [math.log(p + LADE_LOG_EPSILON) for p in training_priors(class_counts)]


def lade_log_uniform(num_classes: int) -> float:
    """log(1/C + 1e-9), the log of the balanced (target) prior in the official ``LADELoss``."""
    return math.log(1.0 / num_classes + LADE_LOG_EPSILON)


@register_loss("lade", LADEParams, citation=LADE_CITATION)
def build_lade(params: LADEParams, context: BuildContext) -> nn.Module:
    """LADE: CE on z + log pi (LADE-CE) plus alpha times the LADE regulariser (Hong et al., CVPR 2021).

    The regulariser makes exp(z_c) estimate p(x|c)/p(x) on the balanced distribution, the
    Donsker-Varadhan bound with ReMINE's penalty, one estimate per class, weighted by pi_c.

    At test time LADE's logits are used as they are for a balanced test set: training already took
    the train prior out (z + log pi inside the loss), so ``posthoc_logit_adjustment`` (which subtracts
    log pi again) does not apply. Left out: adding the log of a known, non-uniform target prior to
    the logits (the paper's shifted test sets); no built-in adjustment takes a target prior.
    """
    from ib_plugins_builtin.losses._base import buffer_device
    from ib_plugins_builtin.losses._lade import LADELoss

    counts = class_counts_for(context, "loss 'lade'")
    if sum(counts) == 0:
        raise ContextError("loss 'lade' needs at least one training sample; every class count is 0.")
    return LADELoss(
        training_priors(counts),
        lade_log_prior(counts),
        lade_log_uniform(len(counts)),
        alpha=params.alpha,
        remine_lambda=params.remine_lambda,
        check_targets=params.check_targets,
        device=buffer_device(context),
    )
