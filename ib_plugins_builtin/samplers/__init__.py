"""Built-in samplers (registered on import; numpy is imported by the factories).

Every sampler's index stream is a pure function of (seed, epoch), so resuming and splitting an epoch
between distributed ranks (``ibcore.sampling.shard``) are exact. The seed is ``params.seed`` when
given, else the run's ``BuildContext.seed``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ibcore import BuildContext, Params, register_sampler

_SEED_DESCRIPTION = "Seed of the index stream; null uses the run's seed (BuildContext.seed)."


class SamplerParams(Params):
    """Params every built-in sampler takes."""

    seed: int | None = Field(None, description=_SEED_DESCRIPTION)


EpochLength = Literal["train_split", "n_max_per_class"]


class ClassBalancedParams(SamplerParams):
    q: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Power of the class size: p_c ∝ n_c^q (0 class-balanced, 0.5 square-root, 1 instance-balanced).",
    )
    mechanics: Literal["independent", "class_aware"] = Field(
        "independent",
        description="independent: every draw picks a class from p_c, then a sample uniformly (with replacement); "
        "class_aware: the official ClassAwareSampler of Kang et al. (classes in a reshuffled cycle, each class's "
        "samples in their own reshuffled cycle; q must be 0).",
    )
    num_samples_cls: int = Field(
        1,
        ge=1,
        description="class_aware only: consecutive samples taken from a class at each visit (official default 1; "
        "Kang et al.'s cRT configs use 4).",
    )
    epoch_length: EpochLength | None = Field(
        None,
        description="Draws per epoch: train_split (N) or n_max_per_class (n_max · C); null: N for independent, "
        "n_max · C for class_aware (the official sampler's length).",
    )

    @model_validator(mode="after")
    def _class_aware_options(self) -> ClassBalancedParams:
        if self.mechanics == "class_aware" and self.q != 0.0:
            raise ValueError(
                f"mechanics 'class_aware' visits every class equally often (q = 0), got q = {self.q}; "
                "use mechanics 'independent' for q > 0"
            )
        if self.mechanics != "class_aware" and "num_samples_cls" in self.model_fields_set:
            raise ValueError("num_samples_cls is only used with mechanics 'class_aware'")
        return self


class ProgressivelyBalancedParams(SamplerParams):
    schedule: Literal["kang", "bagoftricks"] = Field(
        "kang",
        description="Official implementation followed: kang (λ_t = t/(T-1), sample from the class's random cycle; "
        "facebookresearch/classifier-balancing) or bagoftricks (λ_t = (t+1)/T, sample uniformly; "
        "zhangyongshun/BagofTricks-LT).",
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
    mechanics 'class_aware' runs Kang et al.'s official ClassAwareSampler instead (class and sample cycles).
    """
    from ib_plugins_builtin.samplers._streams import ClassCycleSampler, PowerClassSampler

    if params.mechanics == "class_aware":
        return ClassCycleSampler(
            context, _seed(params, context), params.num_samples_cls, params.epoch_length or "n_max_per_class"
        )
    return PowerClassSampler(context, _seed(params, context), params.q, params.epoch_length or "train_split")


@register_sampler("progressively_balanced", ProgressivelyBalancedParams, citation=_KANG)
def build_progressively_balanced(params: ProgressivelyBalancedParams, context: BuildContext) -> Any:
    """Class distribution moving linearly from instance-balanced (epoch 0) to class-balanced (the last epoch)."""
    from ib_plugins_builtin.samplers._streams import ProgressivelyBalancedSampler

    return ProgressivelyBalancedSampler(context, _seed(params, context), params.schedule)


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
    "ProgressivelyBalancedParams",
    "SamplerParams",
    "UndersampleParams",
]
