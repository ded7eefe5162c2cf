"""Vector-Scaling (VS) loss: params, per-class constants and registration (importing this never imports torch).

Kini et al., NeurIPS 2021, 'Label-Imbalanced and Group-Sensitive Classification under Overparameterization';
official code github.com/orparask/VS-Loss (``class_imbalance/losses.py``, ``VSLoss``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from ib_plugins_builtin.losses.class_weights import ClassWeightsField, class_weights_field
from ib_plugins_builtin.losses.formulas import class_counts_for
from ib_plugins_builtin.losses.params import _LossParams
from ibcore import BuildContext, register_loss

if TYPE_CHECKING:
    from torch import nn

VS_CITATION = (
    "Kini et al., NeurIPS 2021, 'Label-Imbalanced and Group-Sensitive Classification under Overparameterization'"
)


class VSParams(_LossParams):
    gamma: float = Field(
        0.3,
        ge=0.0,
        description="Exponent of the multiplicative scale Delta_c = (n_c / n_max)^gamma; 0 gives logit adjustment.",
    )
    tau: float = Field(
        1.0, ge=0.0, description="Scale of the additive offset iota_c = tau * log(pi_c); 0 gives CDT's scaling only."
    )
    class_weights: ClassWeightsField = class_weights_field()


def vs_scales(class_counts: Sequence[int], gamma: float) -> list[float]:
    """The multiplicative logit scales Delta_c = (n_c / n_max)^gamma (1 for the most frequent class).

    The official code divides by (n_max / n_c)^gamma, built as (1/n_c)^gamma / min_k (1/n_k)^gamma.
    """
    n_max = max(class_counts)
    return [(n / n_max) ** gamma for n in class_counts]


def vs_offsets(class_counts: Sequence[int], tau: float) -> list[float]:
    """The additive logit offsets iota_c = tau * log(pi_c), pi_c = n_c / sum(n) (no epsilon, as the official code)."""
    total = math.fsum(class_counts)
    return [tau * math.log(n / total) for n in class_counts]


@register_loss("vs", VSParams, citation=VS_CITATION)
def build_vs(params: VSParams, context: BuildContext) -> nn.Module:
    """Vector-Scaling loss: CE on Delta_c * z_c + iota_c, Delta_c = (n_c/n_max)^gamma, iota_c = tau log pi_c.

    Multiplicative scales move the margins at the end of training, the additive offsets help early
    on (Kini et al.); gamma = 0 is logit adjustment, tau = 0 is CDT. With class weights (DRW) the mean
    is over the true classes' weights, as the official ``F.cross_entropy(weight=...)``.
    """
    from ib_plugins_builtin.losses._base import buffer_device
    from ib_plugins_builtin.losses._vs import VectorScalingLoss
    from ib_plugins_builtin.losses.class_weights import resolve_class_weights

    counts = class_counts_for(context, "loss 'vs'", positive=True)
    weights = resolve_class_weights(params.class_weights, context, "loss 'vs'")
    return VectorScalingLoss(
        weights,
        scales=vs_scales(counts, params.gamma),
        offsets=vs_offsets(counts, params.tau),
        gamma=params.gamma,
        tau=params.tau,
        check_targets=params.check_targets,
        device=buffer_device(context),
    )
