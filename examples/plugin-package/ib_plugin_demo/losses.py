"""Registers the ``poly1`` loss. Imports no torch: the factory imports the implementation lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ibcore import BuildContext, Params, register_loss

if TYPE_CHECKING:
    from torch import nn


class Poly1Params(Params):
    epsilon: float = Field(
        1.0,
        ge=-1.0,
        description="Weight ε of the first polynomial term (1 - p_t); 0 gives cross-entropy, -1 drops the term.",
    )


@register_loss(
    "poly1",
    Poly1Params,
    citation="Leng et al., ICLR 2022, 'PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions'",
)
def build_poly1(params: Poly1Params, context: BuildContext) -> nn.Module:
    """Poly-1 loss: softmax cross-entropy plus ε(1 - p_t), averaged over the batch.

    Follows the official formulation ``CE + epsilon * (1 - pt)`` with a mean over the batch;
    ``sample_weight`` scales each sample's term and the divisor stays the batch size.
    """
    from ib_plugin_demo._poly import Poly1Loss

    return Poly1Loss(epsilon=params.epsilon, num_classes=context.num_classes)
