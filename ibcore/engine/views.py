"""The view of a run that a training step gets (:class:`ibcore.protocols.StepRun`), built once per epoch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from ibcore.context import BuildContext
from ibcore.engine.mixing import draw_plan
from ibcore.engine.runs import EffectiveSpecs, RunState, spec_key
from ibcore.protocols import Loss, Mixer, MixPlan

Forward = Callable[[Tensor, int, Callable[[Tensor], Tensor] | None], Tensor]


@dataclasses.dataclass(eq=False)
class RunView:
    """One run as a step sees it in one epoch: its current model, loss, optimizer and mixer.

    ``mixing`` says whether the mixer is active in this epoch; ``generator`` is the run's mixer stream for
    this epoch. ``specs``, ``backbone_key`` and ``lane`` are what the fused step groups runs by.
    """

    name: str
    model: torch.nn.Module
    loss: Loss
    optimizer: torch.optim.Optimizer
    mixer: Mixer | None
    mixing: bool
    generator: torch.Generator
    context: BuildContext
    specs: EffectiveSpecs
    backbone_key: str
    lane: tuple[str, int]
    bf16: bool
    device_type: str
    _forward: Forward
    epoch: int = 0

    @classmethod
    def of(
        cls, run: RunState, epoch: int, lane: tuple[str, int], bf16: bool, device_type: str, forward: Forward
    ) -> RunView:
        """The view of ``run`` (configured for ``epoch``) in ``epoch``."""
        assert run.loss is not None and run.optimizer is not None and run.specs is not None
        mixing = run.mixer is not None and run.mixer.active(epoch)
        return cls(
            run.name, run.model, run.loss, run.optimizer, run.mixer, mixing, run.mixer_generator(epoch), run.context,
            run.specs, spec_key(run.config.backbone), lane, bf16, device_type, forward, epoch,
        )  # fmt: skip

    def forward(self, x: Tensor, layer: int = 0, mix: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        return self._forward(x, layer, mix)

    def mix_plan(self, x: Tensor, y: Tensor) -> MixPlan | None:
        if not self.mixing or self.mixer is None:
            return None
        return draw_plan(self.mixer, x, y, self.generator)

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16)
