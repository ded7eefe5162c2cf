"""Long-tailed subsets: how many images each class keeps, and which ones.

The counts follow Cao et al. (NeurIPS 2019, LDAM-DRW) and Cui et al. (CVPR 2019):
``n_i = int(n_max * (1/IR) ** (i / (C - 1)))`` for ``exp`` (class 0 is the head), and for ``step``
the first ``C // 2`` classes keep ``n_max`` and the others ``int(n_max * (1/IR))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ibcore import DataError


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float, imbalance_type: str) -> list[int]:
    """Images kept per class, head first; the same arithmetic as kaidic/LDAM-DRW ``get_img_num_per_cls``."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    factor = 1.0 / imbalance_ratio
    if imbalance_type == "exp":
        if num_classes == 1:
            return [int(n_max)]
        # Written exactly as LDAM-DRW does, so float rounding (hence int truncation) matches theirs.
        return [int(n_max * (factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]
    if imbalance_type == "step":
        head = num_classes // 2
        return [int(n_max)] * head + [int(n_max * factor)] * (num_classes - head)
    raise ValueError(f"imbalance_type must be 'exp' or 'step', got {imbalance_type!r}")


def _describe_classes(labels: Sequence[int], shown: int = 10) -> str:
    listed = ", ".join(str(label) for label in labels[:shown]) + (", ..." if len(labels) > shown else "")
    return f"class {listed}" if len(labels) == 1 else f"classes {listed}"


def check_no_empty_class(counts: Sequence[int], imbalance_ratio: float, n_max: int, where: str) -> None:
    """Raise a DataError when the imbalance ratio leaves a class without training images."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(
            f"{where}: imbalance_ratio {imbalance_ratio:g} with {n_max} images in the head class leaves "
            f"{_describe_classes(empty)} with zero training images; "
            "lower imbalance_ratio."
        )


def _class_order(method: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """The function that puts one class's positions in drawn order (one generator for all classes)."""
    if method == "cao":
        legacy = np.random.RandomState(seed)

        def shuffled(positions: np.ndarray) -> np.ndarray:
            legacy.shuffle(positions)  # in place, like np.random.shuffle in LDAM-DRW
            return positions

        return shuffled
    if method == "seeded":
        return np.random.default_rng(seed).permutation
    raise ValueError(f"subset_method must be 'cao' or 'seeded', got {method!r}")


def select_long_tail(
    targets: np.ndarray,
    counts: Sequence[int],
    *,
    method: str,
    seed: int,
    extra_per_class: int = 0,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions into ``targets`` of the long-tailed subset, and ``extra_per_class`` unselected ones per class.

    ``cao`` reproduces the draw of LDAM-DRW and BagofTricks-LT exactly: numpy's legacy generator
    seeded with ``seed`` (``np.random.seed`` then ``np.random.shuffle`` give the same stream), and for
    each class in label order ``idx = np.where(targets == c)[0]; shuffle(idx); keep idx[:n_c]``.
    ``seeded`` draws a per-class permutation from ``numpy.random.default_rng(seed)``. Both return the
    subset as class blocks in label order, in drawn order within a class (as LDAM-DRW stores it).
    The extra positions (for a validation split) are the next ones in each class's drawn order, so they
    never overlap the subset and do not change it.
    """
    draw = _class_order(method, seed)
    selected: list[np.ndarray] = []
    extra: list[np.ndarray] = []
    for label, keep in enumerate(counts):
        positions = np.where(targets == label)[0]
        available = len(positions)
        if available < keep + extra_per_class:
            need = f"{keep} for the long-tailed subset" + (
                f" plus {extra_per_class} for validation" if extra_per_class else ""
            )
            raise DataError(f"{where}: class {label} has {available} training images but needs {need}.")
        positions = draw(positions)
        selected.append(positions[:keep])
        extra.append(positions[keep : keep + extra_per_class])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(selected).astype(np.int64) if selected else empty,
        np.concatenate(extra).astype(np.int64) if extra else empty,
    )
