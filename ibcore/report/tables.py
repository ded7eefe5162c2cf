"""Results tables: one row per method (mean ± std over its seeds, beside its published value), as
Markdown, CSV and JSON; the per-seed rows are kept in every file. Files and CSV headers use the metric
keys (``acc1``); Markdown tables show their display labels (``acc@1 (%)``). The console table is in
:mod:`ibcore.report.console`."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ibcore.report.labels import display_label
from ibcore.report.summary import format_cell, format_number, reference_columns, summarise

_LOWER_IS_BETTER = ("ece", "nll", "loss")
_FIXED = ("run", "method", "seed", "status", "epoch", "reference")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Scalar metric names of per-seed rows in order of first appearance (lists and matrices are left out)."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in _FIXED and key not in columns and (_is_scalar(value) or value is None):
                if any(_is_scalar(r.get(key)) for r in rows):
                    columns.append(key)
    return columns


def lower_is_better(column: str) -> bool:
    return any(word in column.lower() for word in _LOWER_IS_BETTER)


def summary_columns(summaries: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for summary in summaries:
        columns += [name for name in summary["metrics"] if name not in columns]
    return columns


def best_means(summaries: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, float]:
    """The best mean of each column among the methods whose every seed finished."""
    best = {}
    for column in columns:
        means = [s["metrics"][column]["mean"] for s in summaries if s["status"] == "ok" and column in s["metrics"]]
        means = [m for m in means if not math.isnan(m)]
        if means:
            best[column] = min(means) if lower_is_better(column) else max(means)
    return best


def reference_headers(
    summaries: Sequence[dict[str, Any]], labels: Mapping[str, str] | None = None
) -> list[tuple[str, str, str]]:
    """(metric, published header, difference header) for every metric with a published value."""
    metrics = reference_columns(summaries)
    if len(metrics) == 1:
        return [(metrics[0], "published", "Δ")]
    return [(m, f"{display_label(m, labels)} published", f"Δ {display_label(m, labels)}") for m in metrics]


def summary_cells(
    summary: dict[str, Any],
    columns: Sequence[str],
    references: Sequence[tuple[str, str, str]],
    best: dict[str, float],
    mark: Any,
) -> list[str]:
    """The cells of one method's row: every metric, then each published value and our difference."""
    repeated = summary["repeats"] > 1
    cells = []
    for column in columns:
        metric = summary["metrics"].get(column)
        text = format_cell(metric, repeated)
        cells.append(mark(text) if metric is not None and best.get(column) == metric["mean"] else text)
    for metric, _, _ in references:
        published = summary.get("reference", {}).get(metric)
        difference = summary.get("difference", {}).get(metric)
        cells.append(format_number(published))
        cells.append("–" if difference is None else f"{difference:+.2f}")
    return cells


def repeated(summaries: Sequence[dict[str, Any]]) -> bool:
    return any(s["repeats"] > 1 for s in summaries)


def _notes(summaries: Sequence[dict[str, Any]]) -> list[str]:
    parts = []
    if repeated(summaries):
        parts.append("mean ± sample std (n seeds)")
    if reference_columns(summaries):
        parts.append("published: the run's reference; Δ = ours − published")
    return parts


def _markdown_summary(summaries: Sequence[dict[str, Any]], labels: Mapping[str, str] | None) -> list[str]:
    columns = summary_columns(summaries)
    references = reference_headers(summaries, labels)
    best = best_means(summaries, columns)
    shown = [display_label(column, labels) for column in columns]
    header = ["run", "epoch", *shown, *[h for _, p, d in references for h in (p, d)], "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for summary in summaries:
        cells = [summary["run"], format_number(summary["epoch"])]
        cells += summary_cells(summary, columns, references, best, lambda text: f"**{text}**")
        cells.append(summary["status"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = "".join(f" {note[0].upper()}{note[1:]}." for note in _notes(summaries))
    lines.append(
        "Percentages are in percent. **Bold**: best value of the column among finished runs "
        f"(lowest for ECE, NLL and losses).{notes}"
    )
    sources = [(s["run"], s["reference"]["source"]) for s in summaries if s.get("reference")]
    if sources:
        lines += ["", "Published values:", ""] + [f"- {run}: {source}" for run, source in sources]
    return lines


def _markdown_rows(rows: Sequence[dict[str, Any]], labels: Mapping[str, str] | None) -> list[str]:
    """Per-seed rows, as they were measured."""
    columns = metric_columns(rows)
    header = ["run", "seed", "epoch", *[display_label(column, labels) for column in columns], "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row["run"]), format_number(row.get("seed")), format_number(row.get("epoch"))]
        cells += [format_number(row.get(column)) for column in columns]
        cells.append(str(row.get("status", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(rows: Sequence[dict[str, Any]], labels: Mapping[str, str] | None = None) -> str:
    """One row per method; when methods were repeated over seeds, the per-seed rows follow. Column headers
    are the metrics' display ``labels`` (key -> label; a key without one is shown as itself)."""
    summaries = summarise(rows)
    lines = _markdown_summary(summaries, labels)
    if repeated(summaries):
        lines += ["", "Per seed:", "", *_markdown_rows(rows, labels)]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Per-seed rows (one per run and post-hoc variant)."""
    columns = ["run", "method", "seed", "epoch", *metric_columns(rows), "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buffer.getvalue()


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One row per method: ``METRIC_mean``, ``METRIC_std``, ``METRIC_n`` and, where published, the published
    value and our difference (``METRIC_published``, ``METRIC_difference``)."""
    summaries = summarise(rows)
    columns = summary_columns(summaries)
    references = reference_columns(summaries)
    header = ["method", "seeds", "n", "status"]
    for column in columns:
        header += [f"{column}_mean", f"{column}_std", f"{column}_n"]
    for metric in references:
        header += [f"{metric}_published", f"{metric}_difference"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for summary in summaries:
        line: list[Any] = [summary["run"], " ".join(str(s) for s in summary["seeds"]), summary["n"], summary["status"]]
        for column in columns:
            stats = summary["metrics"].get(column) or {}
            line += [stats.get("mean", ""), "" if stats.get("std") is None else stats["std"], stats.get("n", "")]
        for metric in references:
            line += [summary.get("reference", {}).get(metric, ""), summary.get("difference", {}).get(metric, "")]
        writer.writerow(line)
    return buffer.getvalue()


def write_tables(
    run_dir: Path,
    rows: Sequence[dict[str, Any]],
    best_rows: Sequence[dict[str, Any]] = (),
    labels: Mapping[str, str] | None = None,
) -> None:
    """Write results.md, results.csv, summary.csv and results.json (atomically) into ``run_dir``.

    ``labels`` (metric key -> display label) head the Markdown tables and are kept in results.json.
    """
    from ibcore.files import atomic_write_text

    markdown = "## Last epoch\n\n" + to_markdown(rows, labels)
    if best_rows:
        markdown += "\n## Best epoch, selected on the validation split\n\n" + to_markdown(best_rows, labels)
    atomic_write_text(run_dir / "results.md", markdown)
    atomic_write_text(run_dir / "results.csv", to_csv(rows))
    atomic_write_text(run_dir / "summary.csv", summary_csv(rows))
    payload = {
        "last": list(rows),
        "summary": summarise(rows),
        "best_on_validation": list(best_rows),
        "summary_best_on_validation": summarise(best_rows),
        "labels": dict(labels or {}),
    }
    # strict JSON: rows from metrics.jsonl are finite already, but hand-edited rows (ib report) may not be
    text = json.dumps(_strict(payload), indent=2, default=str, allow_nan=False)
    atomic_write_text(run_dir / "results.json", text + "\n")


def print_table(
    rows: Sequence[dict[str, Any]], console: Console | None = None, labels: Mapping[str, str] | None = None
) -> None:
    from ibcore.report.console import console_table

    (console or Console()).print(console_table(rows, labels=labels))


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite number replaced by null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
