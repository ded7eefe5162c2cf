"""Square-root class-aware sampling (Mahajan et al., ECCV 2018): p_c ∝ sqrt(n_c)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ibcore import DataError

_UINT64 = (1 << 64) - 1


def _labels(targets: Any) -> np.ndarray:
    if hasattr(targets, "detach"):  # a torch tensor, possibly on a GPU
        targets = targets.detach().cpu().numpy()
    return np.asarray(targets).astype(np.int64, copy=False).reshape(-1)


class SquareRootSampler:
    """ibcore's sampler protocol: ``indices(epoch)`` (a pure function of (seed, epoch)) and ``len``."""

    def __init__(self, targets: Sequence[int] | Any, num_classes: int, seed: int) -> None:
        labels = _labels(targets)
        if labels.size == 0:
            raise DataError("sampler 'square_root': the train split has no samples.")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            first = int(bad[0])
            raise DataError(
                f"sampler 'square_root': targets[{first}] = {int(labels[first])} is outside [0, {num_classes})."
            )
        self.seed = seed
        self.num_samples = int(labels.size)
        self.counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        weights = np.sqrt(self.counts.astype(np.float64))  # sqrt(0) = 0: empty classes are never drawn
        self.probabilities = weights / weights.sum()
        # Indices grouped by class: class c occupies by_class[offsets[c] : offsets[c] + counts[c]].
        self.by_class = np.argsort(labels, kind="stable").astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def indices(self, epoch: int) -> np.ndarray:
        """int64 indices into the train split for ``epoch``; the same every time it is asked."""
        rng = np.random.default_rng([self.seed & _UINT64, epoch])
        classes = rng.choice(len(self.counts), size=self.num_samples, p=self.probabilities)
        within = rng.integers(0, self.counts[classes])  # a uniform position inside each drawn class
        return self.by_class[self.offsets[classes] + within]

    def __len__(self) -> int:
        return self.num_samples
