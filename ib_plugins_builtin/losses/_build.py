"""Turn validated params and a build context into loss modules (imported lazily by the factories)."""

from __future__ import annotations

from ib_plugins_builtin.losses import formulas
from ib_plugins_builtin.losses._base import ClassificationLoss, buffer_device
from ib_plugins_builtin.losses._sigmoid import SigmoidFocalLoss
from ib_plugins_builtin.losses._softmax import (
    CrossEntropyLoss,
    LabelAwareSmoothingLoss,
    LDAMLoss,
    PriorShiftedCrossEntropy,
    SoftmaxFocalLoss,
)
from ib_plugins_builtin.losses.class_weights import resolve_class_weights
from ib_plugins_builtin.losses.params import (
    BalancedSoftmaxParams,
    CrossEntropyParams,
    FocalParams,
    LabelAwareSmoothingParams,
    LDAMParams,
    LogitAdjustedParams,
    SigmoidCrossEntropyParams,
)
from ibcore import BuildContext


def _num_classes(context: BuildContext, weights: list[float] | None) -> int | None:
    if context.num_classes is not None:
        return context.num_classes
    if context.class_counts is not None:
        return len(context.class_counts)
    return len(weights) if weights is not None else None


def cross_entropy(params: CrossEntropyParams, context: BuildContext) -> ClassificationLoss:
    weights = resolve_class_weights(params.class_weights, context, "loss 'cross_entropy'")
    return CrossEntropyLoss(
        _num_classes(context, weights),
        weights,
        label_smoothing=params.label_smoothing,
        normalisation=params.weighted_normalisation,
        check_targets=params.check_targets,
        device=buffer_device(context),
    )


def sigmoid_cross_entropy(params: SigmoidCrossEntropyParams, context: BuildContext) -> ClassificationLoss:
    weights = resolve_class_weights(params.class_weights, context, "loss 'sigmoid_cross_entropy'")
    return SigmoidFocalLoss(
        _num_classes(context, weights),
        weights,
        gamma=0.0,
        check_targets=params.check_targets,
        device=buffer_device(context),
        name="sigmoid_cross_entropy",
    )


def focal(params: FocalParams, context: BuildContext) -> ClassificationLoss:
    weights = resolve_class_weights(params.class_weights, context, "loss 'focal'")
    loss_type = SigmoidFocalLoss if params.variant == "sigmoid" else SoftmaxFocalLoss
    return loss_type(
        _num_classes(context, weights),
        weights,
        gamma=params.gamma,
        check_targets=params.check_targets,
        device=buffer_device(context),
    )


def ldam(params: LDAMParams, context: BuildContext) -> ClassificationLoss:
    counts = formulas.class_counts_for(context, "loss 'ldam'", positive=True)
    weights = resolve_class_weights(params.class_weights, context, "loss 'ldam'")
    return LDAMLoss(
        len(counts),
        weights,
        margins=formulas.ldam_margins(counts, params.max_m),
        scale=params.s,
        check_targets=params.check_targets,
        device=buffer_device(context),
    )


def balanced_softmax(params: BalancedSoftmaxParams, context: BuildContext) -> ClassificationLoss:
    counts = formulas.class_counts_for(context, "loss 'balanced_softmax'")
    return PriorShiftedCrossEntropy(
        "balanced_softmax",
        formulas.log_counts(counts),
        check_targets=params.check_targets,
        device=buffer_device(context),
    )


def logit_adjusted(params: LogitAdjustedParams, context: BuildContext) -> ClassificationLoss:
    counts = formulas.class_counts_for(context, "loss 'logit_adjusted'")
    return PriorShiftedCrossEntropy(
        "logit_adjusted",
        formulas.log_prior(counts, params.tau),
        check_targets=params.check_targets,
        device=buffer_device(context),
    )


def label_aware_smoothing(params: LabelAwareSmoothingParams, context: BuildContext) -> ClassificationLoss:
    counts = formulas.class_counts_for(context, "loss 'label_aware_smoothing'")
    smoothing = formulas.label_aware_smoothing(
        counts, params.smooth_head, params.smooth_tail, params.shape, params.power
    )
    return LabelAwareSmoothingLoss(smoothing, check_targets=params.check_targets, device=buffer_device(context))
