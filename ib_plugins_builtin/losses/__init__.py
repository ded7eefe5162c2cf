"""Built-in losses (registered on import; torch is imported by the factories).

Every loss is an ``nn.Module`` called as ``loss(logits, targets, sample_weight=None) -> scalar`` with a
``class_weights`` attribute (a (C,) tensor or ``None``). ``sample_weight`` scales each sample's term
without changing the normaliser, so ``loss(z, y_a, w) + loss(z, y_b, 1 - w)`` is the mixed-batch loss.
A loss holds nothing but buffers derived from its params and the build context, so deferred
re-weighting is a stage that builds the loss again with other params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ib_plugins_builtin.losses.class_weights import compute_class_weights
from ib_plugins_builtin.losses.lade import build_lade
from ib_plugins_builtin.losses.params import (
    BalancedSoftmaxParams,
    CrossEntropyParams,
    FocalParams,
    LabelAwareSmoothingParams,
    LDAMParams,
    LogitAdjustedParams,
    SigmoidCrossEntropyParams,
)
from ib_plugins_builtin.losses.vs import build_vs
from ibcore import BuildContext, register_loss

if TYPE_CHECKING:
    from torch import nn


@register_loss("cross_entropy", CrossEntropyParams)
def build_cross_entropy(params: CrossEntropyParams, context: BuildContext) -> nn.Module:
    """Softmax cross-entropy with optional label smoothing and class weights.

    Weighted normalisation: ``weight_sum`` (default, PyTorch's ``F.cross_entropy(weight=...)``) divides
    by the sum of the true classes' weights; ``batch`` (Cui et al. 2019) divides by the batch size.
    """
    from ib_plugins_builtin.losses import _build

    return _build.cross_entropy(params, context)


@register_loss(
    "sigmoid_cross_entropy",
    SigmoidCrossEntropyParams,
    citation="Cui et al., CVPR 2019, 'Class-Balanced Loss Based on Effective Number of Samples'",
)
def build_sigmoid_cross_entropy(params: SigmoidCrossEntropyParams, context: BuildContext) -> nn.Module:
    """One-vs-all sigmoid cross-entropy, summed over classes and divided by the batch size.

    The focal loss with gamma = 0 (Cui et al.'s 'sigmoid' loss): the true class's weight multiplies
    every class term of a sample.
    """
    from ib_plugins_builtin.losses import _build

    return _build.sigmoid_cross_entropy(params, context)


@register_loss(
    "focal",
    FocalParams,
    citation="Lin et al., ICCV 2017, 'Focal Loss for Dense Object Detection'; "
    "Cui et al., CVPR 2019, 'Class-Balanced Loss Based on Effective Number of Samples'",
)
def build_focal(params: FocalParams, context: BuildContext) -> nn.Module:
    """Focal loss (sigmoid as in Lin et al. / Cui et al., or LDAM-DRW's softmax variant), default gamma 1.

    sigmoid: sum over classes and samples of w_y (1 - p_t)^gamma BCE, divided by N (Cui et al.'s code);
    softmax: mean over N of (1 - exp(-ce))^gamma ce with ce the weighted per-sample CE (LDAM-DRW's code).
    """
    from ib_plugins_builtin.losses import _build

    return _build.focal(params, context)


@register_loss(
    "ldam",
    LDAMParams,
    citation="Cao et al., NeurIPS 2019, 'Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss'",
)
def build_ldam(params: LDAMParams, context: BuildContext) -> nn.Module:
    """Label-distribution-aware margin loss: CE on s * (z - m_y) with m_c proportional to n_c^(-1/4).

    The largest margin is ``max_m``; with class weights (DRW) the mean is over the true classes'
    weights, as the official code's ``F.cross_entropy(weight=...)``.
    """
    from ib_plugins_builtin.losses import _build

    return _build.ldam(params, context)


@register_loss(
    "balanced_softmax",
    BalancedSoftmaxParams,
    citation="Ren et al., NeurIPS 2020, 'Balanced Meta-Softmax for Long-Tailed Visual Recognition'",
)
def build_balanced_softmax(params: BalancedSoftmaxParams, context: BuildContext) -> nn.Module:
    """Balanced Softmax: cross-entropy on the logits plus log n_c, the training class counts."""
    from ib_plugins_builtin.losses import _build

    return _build.balanced_softmax(params, context)


@register_loss(
    "logit_adjusted",
    LogitAdjustedParams,
    citation="Menon et al., ICLR 2021, 'Long-Tail Learning via Logit Adjustment'",
)
def build_logit_adjusted(params: LogitAdjustedParams, context: BuildContext) -> nn.Module:
    """Logit-adjusted cross-entropy: CE on the logits plus tau * log pi_c, the training class priors.

    The shift is log(pi^tau + 1e-12), exactly as the official code.
    """
    from ib_plugins_builtin.losses import _build

    return _build.logit_adjusted(params, context)


@register_loss(
    "label_aware_smoothing",
    LabelAwareSmoothingParams,
    citation="Zhong et al., CVPR 2021, 'Improving Calibration for Long-Tailed Recognition' (MiSLAS)",
)
def build_label_aware_smoothing(params: LabelAwareSmoothingParams, context: BuildContext) -> nn.Module:
    """MiSLAS label-aware smoothing: per-class smoothing from smooth_tail (rarest) to smooth_head (most frequent).

    Concave by default, as the official code; the term is averaged over the batch.
    """
    from ib_plugins_builtin.losses import _build

    return _build.label_aware_smoothing(params, context)


__all__ = ["build_lade", "build_vs", "compute_class_weights"]
