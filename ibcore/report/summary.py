"""One row per method: the runs of a method repeated over seeds, as mean ± sample std and n.

Per-seed rows carry ``method`` and ``seed``; this groups them, averages every scalar metric over the
seeds that finished, and puts the published value (a run's ``reference``) and our difference beside
it. A seed that failed is counted in the status, never averaged in silently.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

_NOT_METRICS = ("run", "method", "seed", "status", "epoch", "reference")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def method_of(row: dict[str, Any]) -> str:
    """The method a row belongs to (rows written before seeds existed name only their run)."""
    method = row.get("method")
    return method if isinstance(method, str) else str(row["run"])


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per method, in order of first appearance.

    Each holds ``run`` (the method), ``seeds``, ``n`` (seeds averaged), ``status``, ``epoch`` and
    ``metrics``: ``{name: {"mean", "std", "n", "values"}}`` (``std`` is the sample standard deviation,
    None below two values); with a reference, ``reference`` and ``difference`` (our mean − published).
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(method_of(row), []).append(row)
    return [_summary(method, members) for method, members in by_method.items()]


def _summary(method: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    finished = [row for row in members if row.get("status") == "ok"]
    failed = [row for row in members if row.get("status") != "ok"]
    averaged = finished or members  # a method with no finished seed shows what its failed runs reached
    names: list[str] = []
    for row in members:
        names += [k for k, v in row.items() if k not in _NOT_METRICS and k not in names and _is_scalar(v)]
    metrics: dict[str, dict[str, Any]] = {}
    for name in names:
        values = [float(row[name]) for row in averaged if _is_scalar(row.get(name))]
        if values:
            metrics[name] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values),
                "values": values,
            }
    summary: dict[str, Any] = {
        "run": method,
        "seeds": [row.get("seed") for row in members],
        "repeats": len(members),
        "n": len(averaged) if finished else 0,
        "status": _status(members, failed),
        "epoch": max((row["epoch"] for row in members if _is_scalar(row.get("epoch"))), default=None),
        "metrics": metrics,
    }
    reference = next((row["reference"] for row in members if isinstance(row.get("reference"), dict)), None)
    if reference:
        summary["reference"] = reference
        summary["difference"] = {
            name: metrics[name]["mean"] - float(value)
            for name, value in reference.items()
            if name in metrics and _is_scalar(value)
        }
    return summary


def _status(members: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    if not failed:
        return "ok"
    if len(members) == 1:
        return str(failed[0].get("status"))
    which = "; ".join(f"seed {row.get('seed')}: {str(row.get('status')).removeprefix('failed: ')}" for row in failed)
    return f"failed {len(failed)} of {len(members)} ({which})"


def format_cell(metric: dict[str, Any] | None, repeated: bool) -> str:
    """``77.41 ± 0.32 (3)`` for a repeated method, ``77.41`` for a single run, ``–`` without a value."""
    if metric is None:
        return "–"
    text = format_number(metric["mean"])
    if not repeated:
        return text
    if metric["std"] is not None:
        text += f" ± {format_number(metric['std'])}"
    return f"{text} ({metric['n']})"


def format_number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)


def reference_columns(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Metrics that carry a published value in at least one summary, in order of first appearance."""
    columns: list[str] = []
    for summary in summaries:
        for name in summary.get("difference", {}):
            if name not in columns:
                columns.append(name)
    return columns
