"""Learning-rate schedules as pure functions of (epoch, iteration, iters_per_epoch).

A pure function means resuming needs no scheduler state: the trainer asks for the rate of the step
it is about to take. The rate is ``base · warmup(t) · decay(epoch)``.

Warm-up, for ``epoch < warmup_epochs`` (W), follows one of two published conventions:

* ``start_factor=None`` (kaidic/LDAM-DRW ``adjust_learning_rate``, imbalance-baselines):
  ``(e + 1) / W``, so the first epoch already trains at ``base / W`` and epoch W-1 at ``base``.
* ``start_factor=s`` (BagofTricks-LT ``WarmupMultiStepLR``): ``s + (1 - s) · e / W``, from ``s`` at
  epoch 0 towards 1, reaching ``base`` at epoch W.

With ``per_iteration`` the epoch ``e`` becomes the fractional epoch ``e + i / iters`` (for the first
convention ``(e · iters + i + 1) / (W · iters)``), so the rate rises every step instead of every epoch.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule; ``lr_at`` is the rate for one step."""

    base_lr: float
    kind: str = "multistep"  # multistep | cosine | constant
    warmup_epochs: int = 0
    warmup_start_factor: float | None = None
    warmup_per_iteration: bool = False
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    min_lr: float = 0.0
    total_epochs: int | None = None  # the cosine horizon T

    def warmup_factor(self, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """The warm-up multiplier (1.0 once warm-up is over)."""
        warm = self.warmup_epochs
        if warm == 0 or epoch >= warm:
            return 1.0
        if self.warmup_per_iteration:
            if self.warmup_start_factor is None:
                return (epoch * iters_per_epoch + iteration + 1) / (warm * iters_per_epoch)
            progress = (epoch + iteration / iters_per_epoch) / warm
        else:
            if self.warmup_start_factor is None:
                return (epoch + 1) / warm
            progress = epoch / warm
        start = self.warmup_start_factor
        return start + (1.0 - start) * progress

    def decayed_lr(self, epoch: int) -> float:
        """The rate the schedule gives at ``epoch`` before warm-up scaling."""
        if self.kind == "multistep":
            # Milestone m applies from epoch m on (epoch >= m), as torch's MultiStepLR does.
            return self.base_lr * self.gamma ** bisect.bisect_right(list(self.milestones), epoch)
        if self.kind == "cosine":
            if self.total_epochs is None:
                raise ValueError("a cosine schedule needs total_epochs")
            span = self.total_epochs - self.warmup_epochs
            if epoch < self.warmup_epochs or span <= 0:
                return self.base_lr
            # Half a cosine from base_lr at the end of warm-up to min_lr at epoch T (after the last one).
            progress = min((epoch - self.warmup_epochs) / span, 1.0)
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr

    def lr_at(self, epoch: int, iteration: int = 0, iters_per_epoch: int = 1) -> float:
        """The learning rate for step ``iteration`` (0-based) of ``epoch`` (0-based)."""
        if epoch < 0 or iteration < 0:
            raise ValueError(f"epoch and iteration must be non-negative, got epoch={epoch}, iteration={iteration}.")
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be at least 1, got {iters_per_epoch}.")
        return self.decayed_lr(epoch) * self.warmup_factor(epoch, iteration, iters_per_epoch)
