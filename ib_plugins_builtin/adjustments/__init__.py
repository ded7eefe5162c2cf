"""Built-in post-hoc adjustments (registered on import; torch is imported by the factories).

An adjustment is called as ``adjustment(model, features, logits) -> adjusted logits`` on a trained
model at evaluation time; it never changes the model.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ibcore import BuildContext, Params, register_adjustment


class TauNormParams(Params):
    tau: float = Field(1.0, ge=0.0, description="Power of the class-weight norm: 0 = unchanged, 1 = unit norm.")


class PosthocLogitAdjustmentParams(Params):
    tau: float = Field(1.0, ge=0.0, description="Scaling tau of the log class priors subtracted from the logits.")


@register_adjustment(
    "tau_norm",
    TauNormParams,
    citation="Kang et al., ICLR 2020, 'Decoupling Representation and Classifier for Long-Tailed Recognition'",
)
def build_tau_norm(params: TauNormParams, context: BuildContext) -> Any:
    """tau-normalised classifier: logits recomputed from features with rows W_c / ||W_c||^tau, bias dropped.

    As the official classifier-balancing ``tau_norm.py``, the classifier's bias is not used.
    """
    from ib_plugins_builtin.adjustments._impl import TauNorm

    return TauNorm(params.tau)


@register_adjustment(
    "posthoc_logit_adjustment",
    PosthocLogitAdjustmentParams,
    citation="Menon et al., ICLR 2021, 'Long-Tail Learning via Logit Adjustment'",
)
def build_posthoc_logit_adjustment(params: PosthocLogitAdjustmentParams, context: BuildContext) -> Any:
    """Post-hoc logit adjustment: logits - tau * log pi_c, with pi the training class priors.

    The offset is log(pi^tau + 1e-12), exactly as Menon et al.'s official code.
    """
    from ib_plugins_builtin.adjustments._impl import PosthocLogitAdjustment
    from ib_plugins_builtin.losses.formulas import class_counts_for, log_prior

    counts = class_counts_for(context, "adjustment 'posthoc_logit_adjustment'")
    return PosthocLogitAdjustment(log_prior(counts, params.tau), params.tau)
