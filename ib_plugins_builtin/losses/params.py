"""Params models of the built-in losses (pydantic only: importing this never imports torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ib_plugins_builtin.losses.class_weights import ClassWeightsField, class_weights_field
from ibcore import Params

CHECK_TARGETS_DESCRIPTION = (
    "Check that targets lie in [0, C): null = only for CPU tensors (no device sync), true = always, false = never."
)


class _LossParams(Params):
    check_targets: bool | None = Field(None, description=CHECK_TARGETS_DESCRIPTION)


class CrossEntropyParams(_LossParams):
    label_smoothing: float = Field(0.0, ge=0.0, le=1.0, description="Label smoothing epsilon (PyTorch convention).")
    class_weights: ClassWeightsField = class_weights_field()
    weighted_normalisation: Literal["batch", "weight_sum"] = Field(
        "weight_sum",
        description="With class weights: divide by the sum of the true classes' weights (weight_sum, PyTorch) "
        "or by the batch size (batch, Cui et al.).",
    )


class SigmoidCrossEntropyParams(_LossParams):
    class_weights: ClassWeightsField = class_weights_field()


class FocalParams(_LossParams):
    gamma: float = Field(1.0, ge=0.0, description="Focusing parameter; 0 gives the (sigmoid or softmax) cross-entropy.")
    variant: Literal["sigmoid", "softmax"] = Field(
        "sigmoid", description="sigmoid: Lin et al. / Cui et al. one-vs-all; softmax: LDAM-DRW's FocalLoss."
    )
    class_weights: ClassWeightsField = class_weights_field()


class LDAMParams(_LossParams):
    max_m: float = Field(0.5, gt=0.0, description="Margin of the rarest class; others scale as n_c^(-1/4).")
    s: float = Field(30.0, gt=0.0, description="Scale applied to the margin-adjusted logits.")
    class_weights: ClassWeightsField = class_weights_field()


class BalancedSoftmaxParams(_LossParams):
    pass


class LogitAdjustedParams(_LossParams):
    tau: float = Field(1.0, ge=0.0, description="Scaling tau of the log class priors added to the logits.")


class LabelAwareSmoothingParams(_LossParams):
    smooth_head: float = Field(0.4, ge=0.0, le=1.0, description="Smoothing of the most frequent class.")
    smooth_tail: float = Field(0.1, ge=0.0, le=1.0, description="Smoothing of the rarest class.")
    shape: Literal["concave", "linear", "convex", "exp"] = Field(
        "concave", description="How smoothing grows with the class count (MiSLAS's official default: concave)."
    )
    power: float | None = Field(None, gt=0.0, description="Exponent of shape 'exp' (required there, unused otherwise).")

    @model_validator(mode="after")
    def _power_only_for_exp(self) -> LabelAwareSmoothingParams:
        if self.shape == "exp" and self.power is None:
            raise ValueError("shape 'exp' needs a power (e.g. power: 2.0)")
        if self.shape != "exp" and self.power is not None:
            raise ValueError(f"power is only used with shape 'exp', not {self.shape!r}")
        return self
