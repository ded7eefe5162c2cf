"""Metric keys and their display labels.

Files and APIs use an evaluator's plain keys (``acc1``, ``many_acc``); tables show labels
(``acc@1 (%)``, ``many (%)``) that each evaluator declares in an optional ``labels`` mapping. The core
names no metric: a key without a label is shown as itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def evaluator_labels(evaluators: Iterable[Any]) -> dict[str, str]:
    """The ``labels`` (metric key -> display label) that built evaluators declare, merged in their order."""
    labels: dict[str, str] = {}
    for evaluator in evaluators:
        declared = getattr(evaluator, "labels", None)
        if isinstance(declared, Mapping):
            labels.update({str(k): str(v) for k, v in declared.items() if k not in labels})
    return labels


def headline_key(evaluators: Iterable[Any]) -> str | None:
    """The key of the first evaluator (in the config's order) that declares a ``headline`` metric."""
    for evaluator in evaluators:
        headline = getattr(evaluator, "headline", None)
        if isinstance(headline, str) and headline:
            return headline
    return None


def display_label(key: str, labels: Mapping[str, str] | None = None) -> str:
    """The column header of ``key``: its declared label, else the key itself."""
    return (labels or {}).get(key, key)


def labels_to_keys(reference: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """A ``reference`` whose metric names may be display labels ("acc@1 (%)"), with each label replaced by
    its key (``acc1``); keys, ``source`` and names that are neither are kept as they are."""
    keys = {label: key for key, label in labels.items()}
    return {(name if name in labels else keys.get(name, name)): value for name, value in reference.items()}
