"""Results tables: one row per run (and per post-hoc variant), as Markdown, CSV, JSON and a console table."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_LOWER_IS_BETTER = ("ece", "nll", "loss")
_FIXED = ("run", "status", "epoch")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Scalar metric names in order of first appearance (lists, matrices and groups are left out)."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in _FIXED and key not in columns and (_is_scalar(value) or value is None):
                if any(_is_scalar(r.get(key)) for r in rows):
                    columns.append(key)
    return columns


def lower_is_better(column: str) -> bool:
    return any(word in column.lower() for word in _LOWER_IS_BETTER)


def best_values(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> dict[str, float]:
    """The best value of each column among the runs that finished."""
    best = {}
    for column in columns:
        values = [r[column] for r in rows if r.get("status") == "ok" and _is_scalar(r.get(column))]
        values = [v for v in values if not math.isnan(v)]
        if values:
            best[column] = min(values) if lower_is_better(column) else max(values)
    return best


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = metric_columns(rows)
    best = best_values(rows, columns)
    header = ["run", "epoch", *columns, "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row["run"]), _fmt(row.get("epoch"))]
        for column in columns:
            text = _fmt(row.get(column))
            cells.append(f"**{text}**" if column in best and row.get(column) == best[column] else text)
        cells.append(str(row.get("status", "")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Percentages are in percent. **Bold**: best value of the column among finished runs "
        "(lowest for ECE, NLL and losses)."
    )
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["run", "epoch", *metric_columns(rows), "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buffer.getvalue()


def console_table(rows: Sequence[dict[str, Any]], title: str = "results (last epoch)") -> Table:
    columns = metric_columns(rows)
    best = best_values(rows, columns)
    table = Table(title=title, title_justify="left")
    table.add_column("run", style="bold")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("status")
    for row in rows:
        cells = [str(row["run"])]
        for column in columns:
            text = _fmt(row.get(column))
            cells.append(
                f"[bold green]{text}*[/bold green]" if column in best and row.get(column) == best[column] else text
            )
        status = str(row.get("status", ""))
        cells.append(status if status == "ok" else f"[red]{status}[/red]")
        table.add_row(*cells)
    table.caption = "* best of the column; percentages in %"
    return table


def write_tables(run_dir: Path, rows: Sequence[dict[str, Any]], best_rows: Sequence[dict[str, Any]] = ()) -> None:
    """Write results.md, results.csv and results.json (atomically) into ``run_dir``."""
    from ibcore.files import atomic_write_text

    markdown = "## Last epoch\n\n" + to_markdown(rows)
    if best_rows:
        markdown += "\n## Best epoch, selected on the validation split\n\n" + to_markdown(best_rows)
    atomic_write_text(run_dir / "results.md", markdown)
    atomic_write_text(run_dir / "results.csv", to_csv(rows))
    payload = {"last": list(rows), "best_on_validation": list(best_rows)}
    atomic_write_text(run_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")


def print_table(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(console_table(rows))
