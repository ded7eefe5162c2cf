"""Per-class loss weights: the ``class_weights`` param every weighted loss accepts, and their computation.

A spec is ``null`` (no weights), an explicit list of C non-negative floats (used as given), or a tagged
mapping: ``{name: none}``, ``{name: inverse}`` (1/n_c), ``{name: sqrt_inverse}`` (1/sqrt(n_c)) or
``{name: effective_number, beta: 0.9999}`` ((1-beta)/(1-beta^n_c), Cui et al., CVPR 2019). Every computed
scheme is rescaled so its weights sum to C, as Cui et al.'s official code and LDAM-DRW's deferred
re-weighting do, so a weighted loss stays on the scale of the unweighted one.

Pure Python (float64) and pydantic only: importing this module never imports torch, so param models
can use it while ``ib validate`` stays light.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from ibcore import BuildContext, ConfigError, ConfigIssue, ContextError, Params, PerClass


class NoClassWeights(Params):
    """``{name: none}``: every class weighs 1 (the same as leaving ``class_weights`` out)."""

    name: Literal["none"]


class InverseFrequencyWeights(Params):
    """``{name: inverse}``: w_c proportional to 1/n_c, rescaled to sum to C."""

    name: Literal["inverse"]


class SqrtInverseFrequencyWeights(Params):
    """``{name: sqrt_inverse}``: w_c proportional to 1/sqrt(n_c), rescaled to sum to C."""

    name: Literal["sqrt_inverse"]


class EffectiveNumberWeights(Params):
    """``{name: effective_number, beta}``: w_c proportional to (1-beta)/(1-beta^n_c), rescaled to sum to C.

    Cui et al., CVPR 2019, 'Class-Balanced Loss Based on Effective Number of Samples'. beta = 0 gives
    uniform weights, beta -> 1 approaches inverse frequency; 0.9999 is the value LDAM-DRW's deferred
    re-weighting and Cui et al.'s best CIFAR-10-LT runs use.
    """

    name: Literal["effective_number"]
    beta: float = Field(0.9999, ge=0.0, lt=1.0, description="Hyper-parameter beta in [0, 1) of the effective number.")


_SCHEMES: dict[str, type[Params]] = {
    "none": NoClassWeights,
    "inverse": InverseFrequencyWeights,
    "sqrt_inverse": SqrtInverseFrequencyWeights,
    "effective_number": EffectiveNumberWeights,
}
SCHEME_NAMES: tuple[str, ...] = tuple(_SCHEMES)
WeightScheme = NoClassWeights | InverseFrequencyWeights | SqrtInverseFrequencyWeights | EffectiveNumberWeights
# PerClass: `ib validate` checks the length when the dataset can say its class count without loading data.
ExplicitWeights = Annotated[tuple[Annotated[float, Field(ge=0.0, allow_inf_nan=False)], ...], PerClass]


def _scheme_tag(value: Any) -> str | None:
    """Which branch of the union a raw or validated value belongs to."""
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        name = value.get("name")
        return name if isinstance(name, str) else None
    return getattr(value, "name", None)


def _check_scheme_keys(name: str, value: Mapping[str, Any]) -> None:
    """Reject a key the named scheme does not take, suggesting the one meant (e.g. 'bta' -> 'beta')."""
    allowed = list(_SCHEMES[name].model_fields)
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise PydanticCustomError(
                "class_weights_key",
                "unknown key {key} for class weights {name}{hint}",
                {"key": repr(key), "name": repr(name), "hint": hint},
            )


def _check_scheme_name(value: Any) -> Any:
    """Reject an unknown or missing ``name`` with a message naming it (before the union is tried)."""
    if isinstance(value, Mapping):
        name = value.get("name")
        if name not in SCHEME_NAMES:
            close = difflib.get_close_matches(str(name), SCHEME_NAMES, n=1, cutoff=0.6) if name is not None else []
            hint = f" Did you mean {close[0]!r}?" if close else ""
            if name is None:
                problem = "a class-weight mapping needs a 'name'"
            else:
                problem = f"unknown class-weight scheme {name!r}"
            raise PydanticCustomError(
                "class_weights_scheme",
                "{problem}; choose one of: {choices}.{hint}",
                {"problem": problem, "choices": ", ".join(SCHEME_NAMES), "hint": hint},
            )
        _check_scheme_keys(name, value)
    elif not isinstance(value, (list, tuple, BaseModel)):
        raise PydanticCustomError(
            "class_weights_type",
            "class_weights must be null, a list of C non-negative floats, or a mapping with a name "
            "(none, inverse, sqrt_inverse or effective_number)",
        )
    return value


ClassWeightsSpec = Annotated[
    Annotated[ExplicitWeights, Tag("list")]
    | Annotated[NoClassWeights, Tag("none")]
    | Annotated[InverseFrequencyWeights, Tag("inverse")]
    | Annotated[SqrtInverseFrequencyWeights, Tag("sqrt_inverse")]
    | Annotated[EffectiveNumberWeights, Tag("effective_number")],
    Discriminator(_scheme_tag),
    BeforeValidator(_check_scheme_name),
]
"""The type of a ``class_weights`` param (without ``None``; use :data:`ClassWeightsField`)."""

ClassWeightsField = ClassWeightsSpec | None
"""Annotation for a ``class_weights`` field: ``class_weights: ClassWeightsField = class_weights_field()``."""

CLASS_WEIGHTS_DESCRIPTION = (
    "Per-class weights: null, a list of C floats, or {name: none | inverse | sqrt_inverse | "
    "effective_number (beta)}; computed schemes are rescaled to sum to C."
)


def class_weights_field() -> Any:
    """A pydantic ``Field`` for a loss's ``class_weights`` param (default ``None``)."""
    return Field(None, description=CLASS_WEIGHTS_DESCRIPTION)


_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClassWeightsField)


def parse_class_weights(spec: Any) -> ExplicitWeights | WeightScheme | None:
    """Validate a raw spec (``None``, list, mapping or model); raises :class:`ConfigError` with a path."""
    try:
        return _ADAPTER.validate_python(spec)
    except ValidationError as exc:
        from ibcore.config.errors import issues_from_validation_error

        raise ConfigError(issues_from_validation_error(exc, prefix="class_weights")) from None


def _checked_counts(class_counts: Sequence[int], scheme: str) -> list[int]:
    counts = [int(n) for n in class_counts]
    if not counts:
        raise ContextError(f"class_weights {scheme!r} needs class counts, got an empty list.")
    for index, count in enumerate(counts):
        if count <= 0:
            raise ContextError(
                f"class_weights {scheme!r} needs at least one training sample per class, but class {index} "
                f"has {count}; its weight would be infinite. Give explicit weights instead."
            )
    return counts


def _rescale_to_num_classes(raw: list[float]) -> list[float]:
    total = math.fsum(raw)
    return [len(raw) * w / total for w in raw]


def compute_class_weights(
    spec: Any, class_counts: Sequence[int] | None = None, *, num_classes: int | None = None
) -> list[float]:
    """The C per-class weights a ``class_weights`` spec gives for ``class_counts`` (float64 precision).

    ``None`` and ``{name: none}`` give C ones; an explicit list is returned as given (checked against
    C = ``num_classes`` or ``len(class_counts)``); computed schemes need ``class_counts`` and are
    rescaled to sum to C. Raises :class:`ConfigError` for a malformed spec or a list of the wrong
    length and :class:`ContextError` when counts are missing or a class has none.
    """
    parsed = parse_class_weights(spec)
    expected = num_classes if num_classes is not None else (len(class_counts) if class_counts is not None else None)
    if isinstance(parsed, tuple):
        if expected is not None and len(parsed) != expected:
            raise ConfigError(
                [ConfigIssue("class_weights", f"expected {expected} class weights (one per class), got {len(parsed)}")]
            )
        if not any(w > 0 for w in parsed):
            raise ConfigError([ConfigIssue("class_weights", "at least one class weight must be positive")])
        return [float(w) for w in parsed]
    if parsed is None or isinstance(parsed, NoClassWeights):
        if expected is None:
            raise ContextError("class_weights needs the number of classes (num_classes or class_counts).")
        return [1.0] * expected
    if class_counts is None:
        raise ContextError(f"class_weights {parsed.name!r} needs class_counts; pass the training class counts.")
    if num_classes is not None and len(class_counts) != num_classes:
        raise ContextError(f"class_counts has {len(class_counts)} entries but num_classes is {num_classes}.")
    counts = _checked_counts(class_counts, parsed.name)
    if isinstance(parsed, InverseFrequencyWeights):
        raw = [1.0 / n for n in counts]
    elif isinstance(parsed, SqrtInverseFrequencyWeights):
        raw = [1.0 / math.sqrt(n) for n in counts]
    else:
        beta = parsed.beta
        raw = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    return _rescale_to_num_classes(raw)


def resolve_class_weights(spec: Any, context: BuildContext, component: str) -> list[float] | None:
    """Weights for a loss being built, or ``None`` when the spec asks for none (so the loss stays unweighted).

    ``component`` names the loss in error messages (``"loss 'focal'"``).
    """
    parsed = parse_class_weights(spec)
    if parsed is None or isinstance(parsed, NoClassWeights):
        return None
    if isinstance(parsed, tuple):
        num_classes = context.num_classes
        if num_classes is None and context.class_counts is not None:
            num_classes = len(context.class_counts)
        try:
            return compute_class_weights(parsed, num_classes=num_classes)
        except ConfigError as exc:
            issues = [ConfigIssue("params." + issue.path, f"{component}: {issue.message}") for issue in exc.issues]
            raise ConfigError(issues) from None
    context.require(f"{component} with class_weights {parsed.name!r}", "class_counts")
    return compute_class_weights(parsed, context.class_counts, num_classes=context.num_classes)


__all__ = [
    "CLASS_WEIGHTS_DESCRIPTION",
    "ClassWeightsField",
    "ClassWeightsSpec",
    "EffectiveNumberWeights",
    "InverseFrequencyWeights",
    "NoClassWeights",
    "SCHEME_NAMES",
    "SqrtInverseFrequencyWeights",
    "class_weights_field",
    "compute_class_weights",
    "parse_class_weights",
    "resolve_class_weights",
]
