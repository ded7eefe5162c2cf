"""Registers the ``square_root`` sampler. Imports no numpy: the factory imports it lazily."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ibcore import BuildContext, Params, register_sampler


class SquareRootParams(Params):
    seed: int | None = Field(None, ge=0, description="Seed of the index stream; null uses the run's seed.")


@register_sampler(
    "square_root",
    SquareRootParams,
    citation="Mahajan et al., ECCV 2018, 'Exploring the Limits of Weakly Supervised Pretraining'",
)
def build_square_root(params: SquareRootParams, context: BuildContext) -> Any:
    """Square-root class-aware sampling: a class with p_c ∝ sqrt(n_c), then a sample uniformly within it.

    Each epoch draws as many indices as the train split has samples, with replacement, from
    ``numpy.random.default_rng([seed, epoch])``: a pure function of (seed, epoch).
    """
    context.require("sampler 'square_root'", "targets", "num_classes")
    from ib_plugin_demo._square_root import SquareRootSampler

    seed = params.seed if params.seed is not None else context.seed
    assert context.targets is not None and context.num_classes is not None  # checked by require()
    return SquareRootSampler(context.targets, context.num_classes, seed)
