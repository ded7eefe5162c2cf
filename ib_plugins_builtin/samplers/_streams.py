"""Sampler implementations: every index stream is a pure function of (seed, epoch).

Each epoch draws from ``numpy.random.default_rng([seed, stream, epoch])`` and never from a global
RNG, so a resumed run and every rank of a distributed run see exactly the same stream. Streams that
run on across epochs (the random cycles of the official class-aware samplers) are addressed by
position: any stretch of them is computed from the seed alone, never from an earlier epoch's state.
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
# The random cycles (over the classes, and over each class's samples) and the per-epoch class counts
# of the cycle-based samplers.
_CLASS_CYCLE_STREAM = 2
_MEMBER_CYCLE_STREAM = 3
_CLASS_COUNT_STREAM = 4
_UINT64 = (1 << 64) - 1
# A random cycle's permutations are drawn in blocks of about this many positions (one generator per block).
_CYCLE_BLOCK = 4096


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}.")


def _rng(seed: int, stream: int, epoch: int = 0, *keys: int) -> np.random.Generator:
    _check_epoch(epoch)
    # SeedSequence takes non-negative entropy; map a negative seed onto its two's complement.
    return np.random.default_rng([seed & _UINT64, stream, epoch, *keys])


def _cycle_at(items: np.ndarray, positions: np.ndarray, seed: int, stream: int, key: int) -> np.ndarray:
    """``items`` at ``positions`` of their endless random cycle: one fresh permutation per pass.

    The cycle of the official ``RandomCycleIter`` (facebookresearch/classifier-balancing): every item
    once in a random order, then every item again in a new random order, and so on. Pass ``m`` is
    a function of (seed, stream, key, m) only, so any positions can be read without the ones
    before them.
    """
    n = len(items)
    if n == 1:
        return np.full(len(positions), items[0], dtype=items.dtype)
    passes = positions // n
    offsets = positions % n
    per_block = max(1, _CYCLE_BLOCK // n)
    blocks = passes // per_block
    out = np.empty(len(positions), dtype=items.dtype)
    for block in np.unique(blocks):
        # The permutations of passes [block * per_block, (block + 1) * per_block): sorted random keys.
        orders = _rng(seed, stream, key, int(block)).random((per_block, n)).argsort(axis=1)
        here = blocks == block
        out[here] = items[orders[passes[here] - block * per_block, offsets[here]]]
    return out


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

    def cycled_members(self, classes: np.ndarray, positions: np.ndarray, seed: int) -> np.ndarray:
        """For each draw ``i``: the sample at position ``positions[i]`` of class ``classes[i]``'s random cycle.

        Every class is cycled on its own (all its samples once, reshuffled, again ...), as the
        official samplers do with one ``RandomCycleIter`` per class.
        """
        out = np.empty(len(classes), dtype=np.int64)
        order = np.argsort(classes, kind="stable")
        bounds = np.searchsorted(classes[order], np.arange(self.num_classes + 1))
        for cls in np.flatnonzero(bounds[1:] > bounds[:-1]):
            draws = order[bounds[cls] : bounds[cls + 1]]
            out[draws] = _cycle_at(self.members(int(cls)), positions[draws], seed, _MEMBER_CYCLE_STREAM, int(cls))
        return out


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


class ClassDistributionSampler:
    """Draws a class from a per-class distribution, then a sample uniformly within it, with replacement.

    An epoch has as many draws as the train split has samples. Subclasses define ``class_probabilities``.
    """

    name = "class_distribution"

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


def _epoch_length(index: LabelIndex, epoch_length: str) -> int:
    """Draws per epoch: ``train_split`` is N; ``n_max_per_class`` is n_max times the number of (non-empty) classes."""
    if epoch_length == "n_max_per_class":
        return int(index.counts.max()) * int(np.count_nonzero(index.present))
    return int(index.labels.size)


class PowerClassSampler(ClassDistributionSampler):
    """p_c ∝ n_c^q (Kang et al. 2020): q=0 class-balanced, q=0.5 square-root, q=1 instance-balanced."""

    name = "class_balanced"

    def __init__(self, context: BuildContext, seed: int, q: float, epoch_length: str = "train_split") -> None:
        super().__init__(context, seed)
        self.q = q
        self.num_samples = _epoch_length(self.index, epoch_length)
        present = self.index.present
        # n_c^q computed only where n_c > 0, so that q=0 gives absent classes no mass (0**0 would be 1).
        powered = np.power(self.index.counts.astype(np.float64), q, where=present, out=np.zeros(len(present)))
        self._probabilities = _normalise(powered, present)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        return self._probabilities.copy()


class ClassCycleSampler:
    """The official ``ClassAwareSampler`` of Kang et al. (facebookresearch/classifier-balancing).

    Classes are visited in a random cycle (every class once in a shuffled order, then reshuffled);
    each visit takes the next ``num_samples_cls`` samples of that class's own random cycle. Both
    cycles run on across epochs, as the official iterators do; epoch ``e`` is the stretch of visits
    ``[e·V, (e+1)·V)`` with ``V = ceil(num_samples / num_samples_cls)`` (a visit cut by the end of
    an epoch is not resumed, as in the official generator).
    """

    name = "class_balanced"

    def __init__(self, context: BuildContext, seed: int, num_samples_cls: int, epoch_length: str) -> None:
        self.index = LabelIndex(f"sampler {self.name!r}", context)
        self.seed = seed
        self.num_samples_cls = num_samples_cls
        self.classes = np.flatnonzero(self.index.present).astype(np.int64)
        self.num_samples = _epoch_length(self.index, epoch_length)
        self.visits_per_epoch = -(-self.num_samples // num_samples_cls)

    def indices(self, epoch: int) -> np.ndarray:
        _check_epoch(epoch)
        per_visit, num_present = self.num_samples_cls, len(self.classes)
        visits = epoch * self.visits_per_epoch + np.arange(self.visits_per_epoch, dtype=np.int64)
        visited = _cycle_at(self.classes, visits, self.seed, _CLASS_CYCLE_STREAM, 0)
        # Visit v falls in class cycle v // C, and every class is visited once per cycle: this is the
        # (v // C)-th visit of its class, which therefore starts at position (v // C) · num_samples_cls.
        first = (visits // num_present) * per_visit
        classes = np.repeat(visited, per_visit)[: self.num_samples]
        positions = (first[:, None] + np.arange(per_visit, dtype=np.int64)).reshape(-1)[: self.num_samples]
        return self.index.cycled_members(classes, positions, self.seed)

    def __len__(self) -> int:
        return self.num_samples

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """Every non-empty class equally often (exactly so over whole class cycles)."""
        return _normalise(np.ones(self.index.num_classes), self.index.present)


class ProgressivelyBalancedSampler(ClassDistributionSampler):
    """p_c(t) = (1 - λ_t)·n_c/N + λ_t/C, from instance-balanced towards class-balanced (Kang et al. 2020).

    ``schedule`` picks the official implementation followed, for λ_t and the draw within a class:
    ``kang`` (facebookresearch/classifier-balancing, ClassPrioritySampler): λ_t = t/(T-1), the sample
    from the class's random cycle; ``bagoftricks`` (zhangyongshun/BagofTricks-LT): λ_t = (t+1)/T, the
    sample uniformly with replacement. Both are class-balanced in the last epoch, t = T-1 (T > 1).
    """

    name = "progressively_balanced"

    def __init__(self, context: BuildContext, seed: int, schedule: str = "kang") -> None:
        context.require(f"sampler {self.name!r}", "targets", "num_classes", "epochs")
        super().__init__(context, seed)
        assert context.epochs is not None
        if context.epochs < 1:
            raise ContextError(f"sampler {self.name!r} needs BuildContext.epochs >= 1, got {context.epochs}.")
        self.epochs = int(context.epochs)
        self.schedule = schedule
        present = self.index.present
        self._instance = _normalise(self.index.counts.astype(np.float64), present)
        self._balanced = _normalise(np.ones(self.index.num_classes), present)
        # Class draws before each epoch (the start of every class's cycle in that epoch), filled on demand.
        self._drawn_before: list[np.ndarray] = [np.zeros(self.index.num_classes, dtype=np.int64)]

    def balance(self, epoch: int) -> float:
        """λ_t, the weight of the class-balanced distribution in epoch ``t`` (0-based).

        Epochs past the last one (``t >= T``, the horizon being the whole run) stay at λ = 1, except
        that ``kang`` with ``T = 1`` stays at λ = 0, as ``np.linspace(0, 1, 1)`` does in the official code.
        """
        _check_epoch(epoch)
        if self.schedule == "bagoftricks":
            return min((epoch + 1) / self.epochs, 1.0)
        # np.linspace(0, 1, T)[min(t, T-1)], the official table; a 1-epoch run stays instance-balanced there.
        return 0.0 if self.epochs == 1 else min(epoch, self.epochs - 1) / (self.epochs - 1)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        balance = self.balance(epoch)
        mixed = (1.0 - balance) * self._instance + balance * self._balanced
        return mixed / mixed.sum()

    def _class_counts(self, epoch: int) -> np.ndarray:
        """How often each class is drawn in ``epoch``: multinomial(N, p(t))."""
        probabilities = self.class_probabilities(epoch)
        return _rng(self.seed, _CLASS_COUNT_STREAM, epoch).multinomial(self.num_samples, probabilities)

    def indices(self, epoch: int) -> np.ndarray:
        if self.schedule == "bagoftricks":
            return super().indices(epoch)
        # Independent class draws, written as multinomial counts in a uniformly random order (the
        # same distribution), so that the draws of earlier epochs, which decide where each class's
        # cycle stands, are cheap to recount.
        counts = self._class_counts(epoch)
        in_class_order = np.repeat(np.arange(self.index.num_classes), counts)
        classes = _rng(self.seed, _EPOCH_STREAM, epoch).permutation(in_class_order)
        while len(self._drawn_before) <= epoch:
            before = len(self._drawn_before) - 1
            self._drawn_before.append(self._drawn_before[before] + self._class_counts(before))
        # The k-th draw of class c in this epoch takes position drawn_before[c] + k of c's cycle.
        order = np.argsort(classes, kind="stable")
        rank = np.empty(len(classes), dtype=np.int64)
        rank[order] = np.arange(len(classes)) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = self._drawn_before[epoch][classes] + rank
        return self.index.cycled_members(classes, positions, self.seed)


class EffectiveNumberSampler(ClassDistributionSampler):
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


class ReversedSampler(ClassDistributionSampler):
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
