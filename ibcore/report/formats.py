"""A :class:`~ibcore.report.compare.SummaryTable` as text: the console table, Markdown, CSV or LaTeX.

The conventions are those of ``ib report``: one row per method, ``mean ± std (n)`` for a method repeated over
seeds, the best value of each column marked (highest, lowest for ECE, NLL and losses) among the methods whose
every seed finished, published values and our difference beside them, a status column only when a method
failed. Markdown and LaTeX show the display labels (``acc@1 (%)``); CSV uses the metric keys (``acc1``) and
full precision, as ``summary.csv`` does.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ibcore.errors import IbError
from ibcore.report.compare import SummaryTable
from ibcore.report.console import ResultsTable, _short_status, render_text
from ibcore.report.labels import display_label
from ibcore.report.summary import format_cell, format_number

FORMATS = ("console", "markdown", "csv", "latex")
_EXTENSIONS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tex": "latex", ".txt": "console"}
_BEST_NOTE = "best value of the column among finished runs (lowest for ECE, NLL and losses)"


def format_for(output: str | Path | None, given: str | None) -> str:
    """The format to write: ``given``, else the one ``output``'s extension names (``.md``, ``.csv``, ``.tex``,
    ``.txt``), else the console table."""
    if given is not None:
        return given
    if output is None:
        return "console"
    suffix = Path(output).suffix.lower()
    if suffix not in _EXTENSIONS:
        known = ", ".join(f"{ext} ({fmt})" for ext, fmt in _EXTENSIONS.items())
        raise IbError(f"--output {output}: cannot tell the format from its name; give --format, or end it in {known}")
    return _EXTENSIONS[suffix]


def render(table: SummaryTable, fmt: str, width: int = 200) -> str:
    """``table`` in ``fmt`` (one of :data:`FORMATS`); the console table as plain text ``width`` columns wide."""
    if fmt == "console":
        return render_text(to_console(table), width=width)
    writers: dict[str, Callable[[SummaryTable], str]] = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}
    if fmt not in writers:
        raise IbError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return writers[fmt](table)


def to_console(table: SummaryTable) -> ResultsTable:
    """The table ``ib report`` prints, fitted to the console's width (with an ``experiment`` column when comparing)."""
    return ResultsTable((), table.title, table.labels, summaries=table.summaries, experiments=table.experiments)


# -- shared by Markdown and LaTeX -------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    """One method's row, before formatting: its names, each metric (None where missing) and whether it is
    the best of its column, each (published, difference) pair, and its status."""

    names: list[str]  # [experiment,] run
    metrics: list[tuple[dict[str, Any] | None, bool]]
    references: list[tuple[Any, float | None]]
    repeats: int
    status: str


def _header(table: SummaryTable) -> tuple[list[str], list[str], list[str]]:
    """Plain-text headers: names ([experiment,] run), numbers (every metric's label, then (published, Δ)
    pairs) and [status] when a method did not finish."""
    names = (["experiment"] if table.experiments is not None else []) + ["run"]
    numbers = [display_label(column, table.labels) for column in table.columns]
    numbers += [h for _, published, difference in table.references for h in (published, difference)]
    return names, numbers, [] if table.finished else ["status"]


def _rows(table: SummaryTable) -> list[_Row]:
    rows = []
    for index, summary in enumerate(table.summaries):
        names = [table.experiments[index]] if table.experiments is not None else []
        metrics = [(summary["metrics"].get(c), table.is_best(summary, c)) for c in table.columns]
        references = [
            (summary.get("reference", {}).get(metric), summary.get("difference", {}).get(metric))
            for metric, _, _ in table.references
        ]
        rows.append(_Row([*names, str(summary["run"])], metrics, references, summary["repeats"], summary["status"]))
    return rows


def _difference(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _notes(table: SummaryTable) -> list[str]:
    notes = []
    if table.repeated:
        notes.append("mean ± sample std (n seeds)")
    if table.references:
        notes.append("published: the run's reference; Δ = ours − published")
    return notes


# -- Markdown ---------------------------------------------------------------------------------------------


def _markdown_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def to_markdown(table: SummaryTable) -> str:
    """A GitHub table (numbers right-aligned, the best of each column in bold), then a line saying what the
    marks mean, as in ``results.md``."""
    names, numbers, status = _header(table)
    lines = [
        "| " + " | ".join(_markdown_escape(h) for h in [*names, *numbers, *status]) + " |",
        "|" + "|".join(["---"] * len(names) + ["---:"] * len(numbers) + ["---"] * len(status)) + "|",
    ]
    for row in _rows(table):
        cells = [_markdown_escape(name) for name in row.names]
        for metric, best in row.metrics:
            text = format_cell(metric, row.repeats > 1)
            cells.append(f"**{text}**" if best else text)
        for published, difference in row.references:
            cells += [format_number(published), _difference(difference)]
        cells += [_markdown_escape(row.status)] if status else []
        lines.append("| " + " | ".join(cells) + " |")
    notes = "".join(f" {note[0].upper()}{note[1:]}." for note in _notes(table))
    lines += ["", f"Percentages are in percent. **Bold**: {_BEST_NOTE}.{notes}"]
    return "\n".join(lines) + "\n"


# -- CSV --------------------------------------------------------------------------------------------------


def to_csv(table: SummaryTable) -> str:
    """One line per method, numbers in full precision under the metric keys: ``acc1`` for single runs; with
    seeds ``acc1_mean``, ``acc1_std`` (empty below two values) and ``acc1_n``. Published values and our
    differences follow as ``acc1_published``, ``acc1_difference``."""
    repeated = table.repeated
    header = ["experiment"] if table.experiments is not None else []
    header += ["method", "seeds", "n", "epoch", "status"]
    for column in table.columns:
        header += [f"{column}_mean", f"{column}_std", f"{column}_n"] if repeated else [column]
    for metric, _, _ in table.references:
        header += [f"{metric}_published", f"{metric}_difference"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for index, summary in enumerate(table.summaries):
        line: list[Any] = [table.experiments[index]] if table.experiments is not None else []
        seeds = " ".join("" if seed is None else str(seed) for seed in summary["seeds"])
        line += [summary["run"], seeds, summary["n"], _blank(summary["epoch"]), summary["status"]]
        for column in table.columns:
            stats = summary["metrics"].get(column) or {}
            if repeated:
                line += [_blank(stats.get("mean")), _blank(stats.get("std")), _blank(stats.get("n"))]
            else:
                line.append(_blank(stats.get("mean")))
        for metric, _, _ in table.references:
            published, difference = summary.get("reference", {}).get(metric), summary.get("difference", {}).get(metric)
            line += [_blank(published), _blank(difference)]
        writer.writerow(line)
    return buffer.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


# -- LaTeX ------------------------------------------------------------------------------------------------

_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "[": "{[}",  # a row starting with [ would be read as the optional argument of the \\ before it
    "]": "{]}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "−": "-",
    "–": "--",
}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX typesets it literally: ``cb_focal`` -> ``cb\\_focal``, ``acc@1 (%)`` -> ``acc@1 (\\%)``."""
    return "".join(_LATEX.get(char, char) for char in text)


def to_latex(table: SummaryTable) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``): the best value of each column in ``\\textbf{}``, a
    repeated method's cells as ``mean $\\pm$ std``, every name escaped. Comment lines above it say what the
    numbers are."""
    names, numbers, status = _header(table)
    spec = "l" * len(names) + "r" * len(numbers) + "l" * len(status)
    comments = [f"% {table.title}; bold: {_BEST_NOTE}"]
    if table.repeated:
        comments.append("% mean $\\pm$ sample standard deviation over the seeds; (n): seeds averaged, where not all")
    if table.references:
        comments.append("% published: the run's reference; Delta = ours - published")
    lines = [*comments, "% needs \\usepackage{booktabs}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in [*names, *numbers, *status]) + r" \\")
    lines.append(r"\midrule")
    for row in _rows(table):
        cells = [latex_escape(name) for name in row.names]
        for metric, best in row.metrics:
            cells.append(_latex_metric(metric, best, row.repeats))
        for published, difference in row.references:
            cells += [latex_escape(format_number(published)), "--" if difference is None else f"${difference:+.2f}$"]
        cells += [latex_escape(_short_status(row.status))] if status else []
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _latex_metric(metric: dict[str, Any] | None, best: bool, repeats: int) -> str:
    """``\\textbf{77.41} $\\pm$ 0.32``; ``(2)`` after it when fewer seeds than trained were averaged."""
    if metric is None:
        return "--"
    mean = format_number(metric["mean"])
    text = rf"\textbf{{{mean}}}" if best else mean
    if repeats > 1 and metric["std"] is not None:
        text += rf" $\pm$ {format_number(metric['std'])}"
    if repeats > 1 and metric["n"] < repeats:
        text += f" ({metric['n']})"
    return text
