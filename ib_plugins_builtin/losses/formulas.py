"""Per-class constants the losses and adjustments derive from class counts (pure Python, float64).

Kept apart from the torch code so each formula can be read, tested and documented on its own, and
so the post-hoc adjustments share the exact prior term the logit-adjusted loss uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from ibcore import BuildContext, ContextError

SmoothingShape = Literal["concave", "linear", "convex", "exp"]

# Menon et al.'s official code adds this to pi^tau before the log, so an empty class gets a large
# finite offset instead of -inf.
LOG_PRIOR_EPSILON = 1e-12


def class_counts_for(context: BuildContext, component: str, *, positive: bool = False) -> list[int]:
    """The context's class counts, checked: present, one per class, non-negative (positive if asked)."""
    context.require(component, "class_counts")
    counts = [int(n) for n in context.class_counts or ()]
    if not counts:
        raise ContextError(f"{component} needs class_counts with one entry per class; got an empty list.")
    if context.num_classes is not None and len(counts) != context.num_classes:
        raise ContextError(
            f"{component}: class_counts has {len(counts)} entries but num_classes is {context.num_classes}."
        )
    for index, count in enumerate(counts):
        if count < 0 or (positive and count == 0):
            need = "at least one training sample" if positive else "a non-negative count"
            raise ContextError(f"{component} needs {need} for every class, but class {index} has {count}.")
    return counts


def ldam_margins(class_counts: Sequence[int], max_m: float) -> list[float]:
    """LDAM margins m_c proportional to n_c^(-1/4), rescaled so the largest (rarest class) is ``max_m``.

    Cao et al., NeurIPS 2019, eq. 13; the official code computes 1/sqrt(sqrt(n)) * (max_m / max).
    """
    raw = [1.0 / math.sqrt(math.sqrt(n)) for n in class_counts]
    scale = max_m / max(raw)
    return [m * scale for m in raw]


def log_prior(class_counts: Sequence[int], tau: float) -> list[float]:
    """log(pi_c^tau + 1e-12) with pi the class priors n_c / sum(n), as Menon et al.'s official code.

    For pi_c > 0 this is tau * log(pi_c) up to ~1e-12 relative error.
    """
    total = math.fsum(class_counts)
    return [math.log((n / total) ** tau + LOG_PRIOR_EPSILON) for n in class_counts]


def log_counts(class_counts: Sequence[int]) -> list[float]:
    """log n_c (``-inf`` for an empty class), the Balanced Softmax shift of Ren et al.'s official code."""
    return [math.log(n) if n > 0 else -math.inf for n in class_counts]


def label_aware_smoothing(
    class_counts: Sequence[int],
    smooth_head: float,
    smooth_tail: float,
    shape: SmoothingShape = "concave",
    power: float | None = None,
) -> list[float]:
    """MiSLAS's per-class smoothing epsilon_c, from ``smooth_tail`` (rarest class) to ``smooth_head`` (most frequent).

    With r_c = (n_c - n_min) / (n_max - n_min) (Zhong et al., CVPR 2021, eq. 5 and the official
    ``LabelAwareSmoothing``): concave  tail + (head - tail) * sin(pi/2 * r_c); linear  tail + (head - tail) * r_c;
    convex  head + (head - tail) * sin(3pi/2 + pi/2 * r_c); exp  tail + (head - tail) * r_c^power.
    When every class has the same count (the official code divides by zero) r_c is taken as 1, so
    every class gets ``smooth_head``.
    """
    n_max, n_min = max(class_counts), min(class_counts)
    span = n_max - n_min
    ratios = [(n - n_min) / span if span > 0 else 1.0 for n in class_counts]
    delta = smooth_head - smooth_tail
    if shape == "concave":
        return [smooth_tail + delta * math.sin(math.pi / 2 * r) for r in ratios]
    if shape == "linear":
        return [smooth_tail + delta * r for r in ratios]
    if shape == "convex":
        return [smooth_head + delta * math.sin(1.5 * math.pi + math.pi / 2 * r) for r in ratios]
    if power is None:
        raise ValueError("shape 'exp' needs a power")
    return [smooth_tail + delta * r**power for r in ratios]
