"""Built-in samplers (registered on import; numpy is imported by the factories).

Every sampler's index stream is a pure function of (seed, epoch), so resuming and splitting an epoch
between distributed ranks (``ibcore.sampling.shard``) are exact. The seed is ``params.seed`` when
given, else the run's ``BuildContext.seed``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ibcore import BuildContext, Params, register_sampler

_SEED_DESCRIPTION = "Seed of the index stream; null uses the run's seed (BuildContext.seed)."


class SamplerParams(Params):
    """Params every built-in sampler takes."""

    seed: int | None = Field(None, description=_SEED_DESCRIPTION)


class ClassBalancedParams(SamplerParams):
    q: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Power of the class size: p_c ∝ n_c^q (0 class-balanced, 0.5 square-root, 1 instance-balanced).",
    )


class EffectiveNumberParams(SamplerParams):
    beta: float = Field(
        0.999,
        ge=0.0,
        lt=1.0,
        description="β of the effective number: p_c ∝ (1 - β) / (1 - β^n_c); 0 is class-balanced.",
    )


class OversampleParams(SamplerParams):
    ratio: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Each class is repeated up to floor(ratio · n_max) samples (1.0 balances fully).",
    )


class UndersampleParams(SamplerParams):
    max_ratio: float = Field(
        1.0,
        ge=1.0,
        description="Each class keeps at most round(max_ratio · n_min) samples (1.0 balances fully at n_min).",
    )


def _seed(params: SamplerParams, context: BuildContext) -> int:
    return params.seed if params.seed is not None else context.seed


_BUDA = (
    "Buda et al., Neural Networks 2018, 'A systematic study of the class imbalance problem in "
    "convolutional neural networks'"
)
_KANG = "Kang et al., ICLR 2020, 'Decoupling Representation and Classifier for Long-Tailed Recognition'"


@register_sampler("instance", SamplerParams)
def build_instance(params: SamplerParams, context: BuildContext) -> Any:
    """Plain shuffling: every training sample once per epoch, in a fresh random order (the default)."""
    from ib_plugins_builtin.samplers._streams import InstanceSampler

    return InstanceSampler(context, _seed(params, context))


@register_sampler("class_balanced", ClassBalancedParams, citation=_KANG)
def build_class_balanced(params: ClassBalancedParams, context: BuildContext) -> Any:
    """Class-aware sampling with p_c ∝ n_c^q, then a uniform sample within the class (with replacement).

    q=0 draws every class equally often, q=0.5 is square-root sampling, q=1 matches the data.
    """
    from ib_plugins_builtin.samplers._streams import PowerClassSampler

    return PowerClassSampler(context, _seed(params, context), params.q)


@register_sampler("progressively_balanced", SamplerParams, citation=_KANG)
def build_progressively_balanced(params: SamplerParams, context: BuildContext) -> Any:
    """Class distribution moving linearly from instance-balanced (epoch 0) to class-balanced (epoch T)."""
    from ib_plugins_builtin.samplers._streams import ProgressivelyBalancedSampler

    return ProgressivelyBalancedSampler(context, _seed(params, context))


@register_sampler(
    "effective_number",
    EffectiveNumberParams,
    citation="Cui et al., CVPR 2019, 'Class-Balanced Loss Based on Effective Number of Samples'",
)
def build_effective_number(params: EffectiveNumberParams, context: BuildContext) -> Any:
    """Class-aware sampling with p_c ∝ (1 - β) / (1 - β^n_c), the effective-number class weights."""
    from ib_plugins_builtin.samplers._streams import EffectiveNumberSampler

    return EffectiveNumberSampler(context, _seed(params, context), params.beta)


@register_sampler(
    "reversed",
    SamplerParams,
    citation="Zhou et al., CVPR 2020, 'BBN: Bilateral-Branch Network with Cumulative Learning for "
    "Long-Tailed Visual Recognition'",
)
def build_reversed(params: SamplerParams, context: BuildContext) -> Any:
    """BBN's reversed sampler: p_c ∝ n_max / n_c, so rare classes are drawn most often."""
    from ib_plugins_builtin.samplers._streams import ReversedSampler

    return ReversedSampler(context, _seed(params, context))


@register_sampler("oversample", OversampleParams, citation=_BUDA)
def build_oversample(params: OversampleParams, context: BuildContext) -> Any:
    """Offline random oversampling: repeat each smaller class's samples up to floor(ratio · n_max)."""
    from ib_plugins_builtin.samplers._streams import OverSampler

    return OverSampler(context, _seed(params, context), params.ratio)


@register_sampler("undersample", UndersampleParams, citation=_BUDA)
def build_undersample(params: UndersampleParams, context: BuildContext) -> Any:
    """Offline random undersampling: keep at most round(max_ratio · n_min) samples of each class."""
    from ib_plugins_builtin.samplers._streams import UnderSampler

    return UnderSampler(context, _seed(params, context), params.max_ratio)


__all__ = [
    "ClassBalancedParams",
    "EffectiveNumberParams",
    "OversampleParams",
    "SamplerParams",
    "UndersampleParams",
]
