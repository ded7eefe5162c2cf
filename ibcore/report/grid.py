"""The runs a ``grid:`` expanded, grouped: which setting of each grid did best, and on which split it was chosen.

A setting chosen on the test split overstates what the method would reach on new data; the field misreports
this often, so the notes say it plainly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ibcore.report.labels import display_label
from ibcore.report.tables import lower_is_better, metric_columns


def grid_base(method: str) -> str | None:
    """``cb_focal`` for ``cb_focal[beta=0.99,gamma=1]``; None for a run that no grid expanded."""
    return method.split("[", 1)[0] if method.endswith("]") and "[" in method else None


def _score(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def grid_notes(
    rows: Sequence[Mapping[str, Any]], best_rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str]
) -> list[str]:
    """One line per grid: its best setting (mean over seeds) by the headline metric, and the split it was chosen
    on: validation when the runs had a validation split (their best-epoch rows), else the test split."""
    chosen_on_val = bool(best_rows)
    source = best_rows if chosen_on_val else rows
    columns = metric_columns([dict(row) for row in rows])
    key = next((c for c in columns if c in ("acc1", "balanced_acc")), None) or next(
        (c for c in columns if not lower_is_better(c)), None
    )
    if key is None:
        return []
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in source:
        method = str(row.get("method", ""))
        base = grid_base(method)
        score = _score(row, key)
        if base is not None and score is not None and str(row.get("status", "ok")) == "ok":
            scores[base][method].append(score)
    notes = []
    for base, settings in scores.items():
        if len(settings) < 2:
            continue
        means = {method: sum(values) / len(values) for method, values in settings.items()}
        best = max(means, key=lambda m: means[m])
        label = display_label(key, dict(labels))
        where = (
            "chosen on the validation split"
            if chosen_on_val
            else "chosen on the TEST split (there is no validation split): this overstates the method; report it "
            "as such, or give the dataset a validation split and choose on it"
        )
        notes.append(f"grid {base}: best of {len(settings)} settings is {best} ({label} {means[best]:.2f}), {where}")
    return notes
