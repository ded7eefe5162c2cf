"""An optimizer recipe: builds a torch optimizer for a model and says the learning rate at any step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ib_plugins_builtin.optimizers._schedule import Schedule
from ibcore import TrainingError

NO_DECAY_GROUP = "no_decay"
DECAY_GROUP = "decay"


def _named(parameters: Iterable[Any]) -> list[tuple[str, torch.nn.Parameter]]:
    """Accept ``model.named_parameters()`` or, for convenience, plain ``model.parameters()``."""
    named = []
    for position, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            named.append((item[0], item[1]))
        else:
            named.append((f"param_{position}", item))
    return named


class OptimizerRecipe:
    """What an optimizer factory returns (the optimizer protocol).

    ``create`` builds the torch optimizer; ``lr_at`` is a pure function of the step, which the
    trainer writes into every param group before each step (``apply_lr`` does exactly that, scaled
    by a group's optional ``lr_scale``).
    """

    def __init__(
        self,
        name: str,
        params: Any,
        schedule: Schedule,
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    ) -> None:
        self.name = name
        self.params = params  # the validated params model
        self.schedule = schedule
        self.base_lr = float(schedule.base_lr)
        self._make = make

    def param_groups(self, named_parameters: Iterable[Any]) -> list[dict[str, Any]]:
        """Trainable parameters as torch param groups; with ``no_weight_decay_on_bias_and_norm``,
        every parameter with ndim <= 1 (biases, norm-layer scales and shifts) goes to a group with
        ``weight_decay=0``."""
        trainable = [(n, p) for n, p in _named(named_parameters) if p.requires_grad]
        if not trainable:
            raise TrainingError(f"optimizer {self.name!r} got no trainable parameters (all have requires_grad=False).")
        weight_decay = float(self.params.weight_decay)
        if not self.params.no_weight_decay_on_bias_and_norm:
            return [
                {
                    "params": [p for _, p in trainable],
                    "param_names": [n for n, _ in trainable],
                    "weight_decay": weight_decay,
                    "group_name": DECAY_GROUP,
                }
            ]
        decay = [(n, p) for n, p in trainable if p.ndim > 1]
        no_decay = [(n, p) for n, p in trainable if p.ndim <= 1]
        groups = []
        for group_name, members, wd in ((DECAY_GROUP, decay, weight_decay), (NO_DECAY_GROUP, no_decay, 0.0)):
            if members:
                groups.append(
                    {
                        "params": [p for _, p in members],
                        "param_names": [n for n, _ in members],
                        "weight_decay": wd,
                        "group_name": group_name,
                    }
                )
        return groups

    def create(self, named_parameters: Iterable[Any]) -> torch.optim.Optimizer:
        """A torch optimizer over the trainable parameters, starting at ``lr_at(0, 0, 1)``."""
        optimizer = self._make(self.param_groups(named_parameters))
        initial = self.lr_at(0, 0, 1)
        for group in optimizer.param_groups:
            group["lr"] = initial * float(group.get("lr_scale", 1.0))
        return optimizer

    def lr_at(self, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """The learning rate for step ``iteration`` of ``epoch`` (both 0-based)."""
        return self.schedule.lr_at(epoch, iteration, iters_per_epoch)

    def apply_lr(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """Set every param group's ``lr`` for the coming step (times its ``lr_scale``); returns the rate."""
        lr = self.lr_at(epoch, iteration, iters_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        return lr

    def __repr__(self) -> str:
        return f"OptimizerRecipe({self.name!r}, {self.params!r})"
