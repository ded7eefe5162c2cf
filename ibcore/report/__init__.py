"""Reporting: results tables (console, Markdown, CSV, JSON), metrics files and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ibcore.errors import IbError
from ibcore.report.console import console_table, render_text
from ibcore.report.labels import display_label
from ibcore.report.plots import PLOTS_HINT, matplotlib_available, write_plots
from ibcore.report.results import Results
from ibcore.report.tables import print_table, write_tables

# meta.json's ``metrics_format``: 2 since metrics.jsonl's ``epoch`` counts completed epochs (1 = after the
# first epoch) and metric keys are plain (``acc1``); files without it count epochs from 0.
METRICS_FORMAT = 2


def read_metrics(path: Path, on_skip: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` file that are records: JSON objects with a ``split``, a ``run`` and an
    ``epoch``. Others (a torn last line from a crash, an edited or damaged line) are skipped; ``on_skip``
    hears which, with the reason."""
    lines: list[dict[str, Any]] = []
    if not path.is_file():
        return lines
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        reason = None
        try:
            line = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            reason = f"not JSON ({type(exc).__name__})"
        else:
            if not isinstance(line, dict):
                reason = f"a JSON {type(line).__name__}, not an object"
            elif not (isinstance(line.get("split"), str) and isinstance(line.get("run"), str)):
                reason = "no 'split' and 'run' names"
            elif not isinstance(line.get("epoch"), int) or isinstance(line.get("epoch"), bool):
                reason = "no whole-number 'epoch'"
            else:
                lines.append(line)
        if reason is not None and on_skip is not None:
            on_skip(f"{path} line {number} skipped: {reason}")
    return lines


def _rows(payload: Any, key: str, path: Path) -> list[dict[str, Any]]:
    """``payload[key]``: a list of rows, each a mapping with a run name (checked: the file may be edited)."""
    rows = payload.get(key, []) if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("run"), str) for r in rows):
        raise IbError(f"{path}: '{key}' must be a list of rows with a 'run' name; the file is damaged or not ibcore's")
    return rows


def completed_epochs(lines: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.jsonl lines whose ``epoch`` counts completed epochs; an older file (0-based) is shifted by one."""
    if isinstance(meta.get("metrics_format"), int) and meta["metrics_format"] >= METRICS_FORMAT:
        return lines
    return [{**line, "epoch": line["epoch"] + 1} if isinstance(line.get("epoch"), int) else line for line in lines]


def render_run_dir(run_dir: str | Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Re-render tables and plots of ``run_dir`` from its results.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise IbError(f"{results_path} does not exist; is {run_dir} a finished ibcore run directory?")
    try:
        payload = json.loads(results_path.read_text(encoding="utf-8"))
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IbError(f"cannot read the results of {run_dir}: {exc}") from exc
    rows, best_rows = _rows(payload, "last", results_path), _rows(payload, "best_on_validation", results_path)
    if not isinstance(meta, dict):
        raise IbError(f"{run_dir / 'meta.json'} is not a mapping; is {run_dir} an ibcore run directory?")
    labels = payload.get("labels")
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    write_tables(run_dir, rows, best_rows, labels)
    console = console or Console()
    skipped = lambda message: console.print(f"[yellow]{escape(message)}[/yellow]")  # noqa: E731
    metrics = completed_epochs(read_metrics(run_dir / "metrics.jsonl", skipped), meta)
    write_plots(run_dir, metrics, rows, meta.get("class_counts", []))
    print_table(rows, console, labels)
    if not matplotlib_available():
        console.print(f"[yellow]{escape(PLOTS_HINT)}[/yellow]")
    return list(rows)


__all__ = [
    "METRICS_FORMAT",
    "PLOTS_HINT",
    "Results",
    "completed_epochs",
    "console_table",
    "display_label",
    "print_table",
    "read_metrics",
    "render_run_dir",
    "render_text",
    "write_plots",
    "write_tables",
]
