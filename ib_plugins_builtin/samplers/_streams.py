"""Sampler implementations: every index stream is a pure function of (seed, epoch).

Each epoch draws from ``numpy.random.default_rng([seed, stream, epoch])`` and never from a global
RNG, so a resumed run and every rank of a distributed run see exactly the same stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ibcore import BuildContext, ContextError, DataError

# Separate RNG streams for the per-epoch draw and the offline (whole-run) selection, so that the
# selection of an over/undersampler never coincides with any epoch's shuffle.
_EPOCH_STREAM = 0
_SELECTION_STREAM = 1
_UINT64 = (1 << 64) - 1


def _rng(seed: int, stream: int, epoch: int = 0) -> np.random.Generator:
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}.")
    # SeedSequence takes non-negative entropy; map a negative seed onto its two's complement.
    return np.random.default_rng([seed & _UINT64, stream, epoch])


def _as_label_array(targets: Any) -> np.ndarray:
    if hasattr(targets, "detach"):  # a torch tensor, possibly on the GPU; avoids importing torch here
        targets = targets.detach().cpu().numpy()
    return np.asarray(targets).astype(np.int64, copy=False).reshape(-1)


class LabelIndex:
    """The train split's labels grouped by class: what every class-aware sampler needs."""

    def __init__(self, component: str, context: BuildContext) -> None:
        context.require(component, "targets", "num_classes")
        assert context.targets is not None and context.num_classes is not None  # checked by require()
        labels = _as_label_array(context.targets)
        num_classes = int(context.num_classes)
        if labels.size == 0:
            raise DataError(f"{component}: the train split has no samples (BuildContext.targets is empty).")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            first = int(bad[0])
            raise DataError(
                f"{component}: targets[{first}] = {int(labels[first])} is outside [0, {num_classes}) "
                f"(num_classes={num_classes}); {bad.size} label(s) are out of range."
            )
        counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        if context.class_counts is not None and tuple(int(c) for c in context.class_counts) != tuple(counts):
            raise ContextError(
                f"{component}: BuildContext.class_counts {tuple(context.class_counts)} disagree with the counts "
                f"of BuildContext.targets {tuple(int(c) for c in counts)}; build both from the same split."
            )
        self.labels = labels
        self.counts = counts
        self.num_classes = num_classes
        # Indices sorted by class (stable, so each class keeps dataset order); class c occupies
        # by_class[offsets[c] : offsets[c] + counts[c]].
        self.by_class = np.argsort(labels, kind="stable").astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    @property
    def present(self) -> np.ndarray:
        """Mask of the classes that have at least one training sample (only those can be drawn)."""
        return self.counts > 0

    def members(self, cls: int) -> np.ndarray:
        start = int(self.offsets[cls])
        return self.by_class[start : start + int(self.counts[cls])]


def _normalise(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per-class probabilities from non-negative weights; classes without samples get 0."""
    masked = np.where(present, weights, 0.0).astype(np.float64)
    return masked / masked.sum()


class InstanceSampler:
    """Plain shuffling: a fresh permutation of every training index each epoch."""

    def __init__(self, context: BuildContext, seed: int) -> None:
        context.require("sampler 'instance'", "targets")
        assert context.targets is not None
        labels = _as_label_array(context.targets)
        self.seed = seed
        self.num_samples = int(labels.size)
        self._counts = np.bincount(labels, minlength=int(context.num_classes or 0)) if labels.size else None

    def indices(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _EPOCH_STREAM, epoch).permutation(self.num_samples).astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """Each class's share of every epoch: ``n_c / N``."""
        if self._counts is None:
            return np.zeros(0)
        return self._counts / self._counts.sum()


class ClassAwareSampler:
    """Draws a class from a per-class distribution, then a sample uniformly within it, with replacement.

    An epoch has as many draws as the train split has samples. Subclasses set ``_probabilities``.
    """

    name = "class_aware"

    def __init__(self, context: BuildContext, seed: int) -> None:
        self.index = LabelIndex(f"sampler {self.name!r}", context)
        self.seed = seed
        self.num_samples = int(self.index.labels.size)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """The distribution each draw of ``epoch`` picks its class from."""
        raise NotImplementedError

    def indices(self, epoch: int) -> np.ndarray:
        rng = _rng(self.seed, _EPOCH_STREAM, epoch)
        probabilities = self.class_probabilities(epoch)
        classes = rng.choice(self.index.num_classes, size=self.num_samples, p=probabilities)
        # Uniform position inside each drawn class, vectorised: high = that class's size.
        within = rng.integers(0, self.index.counts[classes])
        return self.index.by_class[self.index.offsets[classes] + within].astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples


class PowerClassSampler(ClassAwareSampler):
    """p_c ∝ n_c^q (Kang et al. 2020): q=0 class-balanced, q=0.5 square-root, q=1 instance-balanced."""

    name = "class_balanced"

    def __init__(self, context: BuildContext, seed: int, q: float) -> None:
        super().__init__(context, seed)
        self.q = q
        present = self.index.present
        # n_c^q computed only where n_c > 0, so that q=0 gives absent classes no mass (0**0 would be 1).
        powered = np.power(self.index.counts.astype(np.float64), q, where=present, out=np.zeros(len(present)))
        self._probabilities = _normalise(powered, present)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._probabilities.copy()


class ProgressivelyBalancedSampler(ClassAwareSampler):
    """p_c(t) = (1 - t/T)·n_c/N + (t/T)·1/C: instance-balanced at epoch 0, moving to class-balanced."""

    name = "progressively_balanced"

    def __init__(self, context: BuildContext, seed: int) -> None:
        context.require(f"sampler {self.name!r}", "targets", "num_classes", "epochs")
        super().__init__(context, seed)
        assert context.epochs is not None
        if context.epochs < 1:
            raise ContextError(f"sampler {self.name!r} needs BuildContext.epochs >= 1, got {context.epochs}.")
        self.epochs = int(context.epochs)
        present = self.index.present
        self._instance = _normalise(self.index.counts.astype(np.float64), present)
        self._balanced = _normalise(np.ones(self.index.num_classes), present)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        # Epochs past T (a later stage) stay class-balanced rather than extrapolating.
        progress = min(max(epoch / self.epochs, 0.0), 1.0)
        mixed = (1.0 - progress) * self._instance + progress * self._balanced
        return mixed / mixed.sum()


class EffectiveNumberSampler(ClassAwareSampler):
    """p_c ∝ (1 - β) / (1 - β^n_c), the class-balanced weight of Cui et al. (CVPR 2019)."""

    name = "effective_number"

    def __init__(self, context: BuildContext, seed: int, beta: float) -> None:
        super().__init__(context, seed)
        self.beta = beta
        present = self.index.present
        counts = np.where(present, self.index.counts, 1).astype(np.float64)
        weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
        self._probabilities = _normalise(weights, present)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._probabilities.copy()


class ReversedSampler(ClassAwareSampler):
    """p_c ∝ n_max / n_c, BBN's reversed sampler (Zhou et al., CVPR 2020): the rarest class is drawn most."""

    name = "reversed"

    def __init__(self, context: BuildContext, seed: int) -> None:
        super().__init__(context, seed)
        present = self.index.present
        counts = self.index.counts.astype(np.float64)
        weights = np.divide(counts.max(), counts, where=present, out=np.zeros(len(counts)))
        self._probabilities = _normalise(weights, present)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._probabilities.copy()


class OfflineSampler:
    """A multiset of indices fixed for the whole run (a function of the seed), shuffled every epoch."""

    name = "offline"

    def __init__(self, context: BuildContext, seed: int) -> None:
        self.index = LabelIndex(f"sampler {self.name!r}", context)
        self.seed = seed
        selection_rng = _rng(seed, _SELECTION_STREAM)
        self.selected = np.concatenate(
            [
                self._select(self.index.members(c), int(target), selection_rng)
                for c, target in enumerate(self.target_counts())
            ]
        ).astype(np.int64)
        self.num_samples = int(self.selected.size)

    def target_counts(self) -> Sequence[int]:
        """How many indices each class keeps in the selected multiset."""
        raise NotImplementedError

    @staticmethod
    def _select(members: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
        """``target`` indices of one class: whole copies of the class, then a random subset of the rest."""
        if target == 0 or members.size == 0:
            return np.zeros(0, dtype=np.int64)
        copies, remainder = divmod(target, members.size)
        extra = rng.choice(members, size=remainder, replace=False)
        return np.concatenate([np.tile(members, copies), extra])

    def selected_class_counts(self) -> np.ndarray:
        """Per-class counts of the selected multiset (what every epoch contains)."""
        return np.bincount(self.index.labels[self.selected], minlength=self.index.num_classes)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """Each class's share of the selected multiset (the same every epoch)."""
        counts = self.selected_class_counts()
        return counts / counts.sum()

    def indices(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, _EPOCH_STREAM, epoch).permutation(self.selected).astype(np.int64)

    def __len__(self) -> int:
        return self.num_samples


class OverSampler(OfflineSampler):
    """Repeats samples of each smaller class until it has floor(ratio · n_max) of them."""

    name = "oversample"

    def __init__(self, context: BuildContext, seed: int, ratio: float) -> None:
        self.ratio = ratio
        super().__init__(context, seed)

    def target_counts(self) -> Sequence[int]:
        counts = self.index.counts
        floor = int(math.floor(self.ratio * int(counts.max())))
        # Never drops samples: a class already above the floor keeps all of its own.
        return [max(int(n), floor) if n > 0 else 0 for n in counts]


class UnderSampler(OfflineSampler):
    """Drops samples of each larger class down to round(max_ratio · n_min) of them."""

    name = "undersample"

    def __init__(self, context: BuildContext, seed: int, max_ratio: float) -> None:
        self.max_ratio = max_ratio
        super().__init__(context, seed)

    def target_counts(self) -> Sequence[int]:
        counts = self.index.counts
        n_min = int(counts[counts > 0].min())
        cap = max(n_min, int(round(self.max_ratio * n_min)))
        return [min(int(n), cap) for n in counts]
