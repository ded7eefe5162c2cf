"""What a component may know about the run it is built for."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ibcore.errors import ContextError


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """Facts about the data and the run, handed to every factory.

    Components that depend on the data (class-balanced weights, LDAM margins, samplers) read
    ``class_counts``/``targets`` from here; none of them iterates a dataset to count classes.
    ``epochs`` and ``iters_per_epoch`` let schedules and progressive samplers know the horizon.
    ``backbone`` is set only when a mixer or post-hoc adjustment needs the model.
    """

    num_classes: int | None = None
    class_counts: tuple[int, ...] | None = None
    targets: Sequence[int] | None = None
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None
    device: str = "cpu"
    seed: int = 0
    backbone: Any = None

    @classmethod
    def from_targets(cls, targets: Sequence[int], num_classes: int, **kwargs: Any) -> BuildContext:
        """A context whose ``class_counts`` are counted from ``targets`` (labels, not images)."""
        counts = [0] * num_classes
        for label in targets:
            counts[int(label)] += 1
        return cls(num_classes=num_classes, class_counts=tuple(counts), targets=targets, **kwargs)

    def require(self, component: str, *fields: str) -> None:
        """Raise a :class:`ContextError` naming ``component`` if any of ``fields`` is missing."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ContextError(
                f"{component} needs {', '.join(missing)} in its BuildContext; build it through the trainer "
                f"or pass BuildContext({', '.join(f'{m}=...' for m in missing)})."
            )

    def replace(self, **changes: Any) -> BuildContext:
        return dataclasses.replace(self, **changes)
