"""Built-in evaluators (registered on import; torch is imported by the factories).

Evaluators are torchmetrics-style (``reset``/``update``/``compute``); state stays on the logits'
device and ``update`` never syncs with the host. Keys are plain identifiers (``acc1``, ``many_acc``); percentages
are in percent (0-100), and each evaluator's ``labels`` give the tables' column headers ("acc@1 (%)").
Lists, dicts and matrices are allowed values and stay out of tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from ibcore import BuildContext, ConfigError, ConfigIssue, ContextError, NoParams, Params, register_evaluator

if TYPE_CHECKING:
    from ib_plugins_builtin.evaluators import _impl


class AccuracyParams(Params):
    """Params of top-k accuracy."""

    top_k: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (1,), min_length=1, description="the k of each top-k accuracy to report, e.g. [1, 5]"
    )


class ShotAccuracyParams(Params):
    """Params of many/medium/few-shot accuracy."""

    many_threshold: int = Field(100, ge=0, description="classes with MORE training images than this are 'many'")
    few_threshold: int = Field(20, ge=0, description="classes with FEWER training images than this are 'few'")

    @model_validator(mode="after")
    def _ordered(self) -> ShotAccuracyParams:
        if self.few_threshold > self.many_threshold:
            raise ValueError(
                f"few_threshold ({self.few_threshold}) must not exceed many_threshold ({self.many_threshold})"
            )
        return self


class EceParams(Params):
    """Params of the expected calibration error."""

    num_bins: int = Field(15, ge=1, description="equal-width confidence bins (Guo et al. use 15)")


def _num_classes(component: str, context: BuildContext) -> int:
    context.require(component, "num_classes")
    num_classes = int(context.num_classes)  # type: ignore[arg-type]  # require() checked it is set
    if num_classes < 1:
        raise ContextError(f"{component} needs num_classes >= 1 in its BuildContext, got {num_classes}.")
    return num_classes


@register_evaluator("accuracy", AccuracyParams)
def build_accuracy(params: AccuracyParams, context: BuildContext) -> _impl.Accuracy:
    """Top-k accuracy in percent (keys ``acc1``, ``acc5``, ...; shown as "acc@1 (%)", ...)."""
    from ib_plugins_builtin.evaluators._impl import Accuracy

    num_classes = _num_classes("evaluator 'accuracy'", context)
    too_large = [k for k in params.top_k if k > num_classes]
    if too_large:
        raise ConfigError(
            [ConfigIssue("params.top_k", f"top-k needs k <= num_classes ({num_classes}); got {too_large}")]
        )
    return Accuracy(num_classes, params.top_k)


@register_evaluator("per_class_accuracy", NoParams)
def build_per_class_accuracy(params: NoParams, context: BuildContext) -> _impl.PerClassAccuracy:
    """Accuracy of every class in percent (``per_class_acc``; None for a class absent from the test split)."""
    from ib_plugins_builtin.evaluators._impl import PerClassAccuracy

    return PerClassAccuracy(_num_classes("evaluator 'per_class_accuracy'", context))


@register_evaluator(
    "shot_accuracy",
    ShotAccuracyParams,
    citation="Liu et al., CVPR 2019, 'Large-Scale Long-Tailed Recognition in an Open World' (OLTR); "
    "Kang et al., ICLR 2020, 'Decoupling Representation and Classifier for Long-Tailed Recognition'",
)
def build_shot_accuracy(params: ShotAccuracyParams, context: BuildContext) -> _impl.ShotAccuracy:
    """Many/medium/few-shot accuracy: mean per-class accuracy of classes grouped by training-set size.

    Keys ``many_acc``, ``medium_acc``, ``few_acc`` (shown as "many (%)", ...) and ``shot_groups``.
    """
    from ib_plugins_builtin.evaluators._impl import ShotAccuracy

    component = "evaluator 'shot_accuracy'"
    num_classes = _num_classes(component, context)
    context.require(component, "class_counts")
    counts = tuple(context.class_counts or ())
    if len(counts) != num_classes:
        raise ContextError(f"{component}: class_counts has {len(counts)} entries but num_classes is {num_classes}.")
    return ShotAccuracy(num_classes, counts, params.many_threshold, params.few_threshold)


@register_evaluator("balanced_accuracy", NoParams)
def build_balanced_accuracy(params: NoParams, context: BuildContext) -> _impl.BalancedAccuracy:
    """Balanced accuracy in percent: the mean of per-class recalls (``balanced_acc``)."""
    from ib_plugins_builtin.evaluators._impl import BalancedAccuracy

    return BalancedAccuracy(_num_classes("evaluator 'balanced_accuracy'", context))


@register_evaluator("macro_f1", NoParams)
def build_macro_f1(params: NoParams, context: BuildContext) -> _impl.MacroF1:
    """Macro-averaged F1 score in percent (``macro_f1``)."""
    from ib_plugins_builtin.evaluators._impl import MacroF1

    return MacroF1(_num_classes("evaluator 'macro_f1'", context))


@register_evaluator("ece", EceParams, citation="Guo et al., ICML 2017, 'On Calibration of Modern Neural Networks'")
def build_ece(params: EceParams, context: BuildContext) -> _impl.ExpectedCalibrationError:
    """Expected calibration error in percent over equal-width confidence bins (``ece``)."""
    from ib_plugins_builtin.evaluators._impl import ExpectedCalibrationError

    return ExpectedCalibrationError(_num_classes("evaluator 'ece'", context), params.num_bins)


@register_evaluator("nll", NoParams)
def build_nll(params: NoParams, context: BuildContext) -> _impl.NegativeLogLikelihood:
    """Mean negative log-likelihood of the test labels under the softmax (``nll``, nats)."""
    from ib_plugins_builtin.evaluators._impl import NegativeLogLikelihood

    return NegativeLogLikelihood(_num_classes("evaluator 'nll'", context))


@register_evaluator("confusion_matrix", NoParams)
def build_confusion_matrix(params: NoParams, context: BuildContext) -> _impl.ConfusionMatrix:
    """The confusion matrix as a C x C nested list, rows = true class (``confusion_matrix``)."""
    from ib_plugins_builtin.evaluators._impl import ConfusionMatrix

    return ConfusionMatrix(_num_classes("evaluator 'confusion_matrix'", context))


__all__ = [
    "AccuracyParams",
    "EceParams",
    "ShotAccuracyParams",
    "build_accuracy",
    "build_balanced_accuracy",
    "build_confusion_matrix",
    "build_ece",
    "build_macro_f1",
    "build_nll",
    "build_per_class_accuracy",
    "build_shot_accuracy",
]
