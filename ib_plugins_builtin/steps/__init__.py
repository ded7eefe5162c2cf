"""Built-in training steps (registered on import; torch is imported by the factories).

``standard`` is what every run does unless it names another step: forward, the run's loss (mixed when
its mixer mixes), backward, one optimizer step. Its runs may be stacked by the fused path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ibcore import BuildContext, NoParams, register_step

if TYPE_CHECKING:
    from ibcore.engine.steps.standard import StandardStep


@register_step("standard", NoParams)
def build_standard(params: NoParams, context: BuildContext) -> StandardStep:
    """Forward, loss (mixed when the run mixes), backward, one optimizer step; fusable with other runs."""
    from ibcore.engine.steps.standard import StandardStep

    return StandardStep()


__all__ = ["build_standard"]
