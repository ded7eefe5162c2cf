"""The results table on the console: one row per method, fitted to the terminal's width.

A run name is never cut. When the table is wider than the console, the metric headers wrap first
(``acc@1`` over ``(%)``), then a repeated method's cells go on two lines (the mean over ``±std``), and
if that is still too wide, the metric columns are split over several tables that each repeat the
run column. A failed method's full status is printed below the table, not squeezed into a column.
"""

from __future__ import annotations

import dataclasses
import io
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ibcore.report.labels import display_label
from ibcore.report.summary import format_number, reference_columns, summarise
from ibcore.report.tables import best_means, reference_headers, repeated, summary_columns

_NATURAL = 1_000_000  # a width no table reaches: measuring with it gives a table's unwrapped width


@dataclasses.dataclass
class _Column:
    header: str
    one_line: list[Text]  # one cell per method, ``77.41 ±0.32``
    two_lines: list[Text]  # the same, ``77.41`` over ``±0.32``
    style: str = ""


def _short_status(status: str) -> str:
    """``failed`` or ``failed 1 of 3``: the full status is printed below the table."""
    if status == "ok":
        return "ok"
    return "failed" if status.startswith("failed:") else status.split(" (", 1)[0]


class ResultsTable:
    """A rich renderable: the per-method summary of ``rows``, as wide as the console allows."""

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        title: str = "results (last epoch)",
        labels: Mapping[str, str] | None = None,
        *,
        summaries: Sequence[dict[str, Any]] | None = None,
        experiments: Sequence[str] | None = None,
    ) -> None:
        """``summaries`` (of several run directories) replace those of ``rows``; ``experiments``, one per summary,
        add a first column naming the experiment each row comes from (``ib compare``)."""
        self.summaries = list(summaries) if summaries is not None else summarise(rows)
        self.experiments = list(experiments) if experiments is not None else None
        self.title = title
        self.labels = dict(labels or {})

    # -- cells ------------------------------------------------------------------------------------

    def _metric_column(self, column: str, best: dict[str, float]) -> _Column:
        one, two = [], []
        for summary in self.summaries:
            metric = summary["metrics"].get(column)
            if metric is None:
                one.append(Text("–"))
                two.append(Text("–"))
                continue
            is_best = best.get(column) == metric["mean"]
            mean = Text(format_number(metric["mean"]) + ("*" if is_best else ""), style="bold green" if is_best else "")
            spread = ""
            if summary["repeats"] > 1:
                if metric["std"] is not None:
                    spread = f"±{format_number(metric['std'])}"
                if metric["n"] < summary["repeats"]:
                    spread = f"{spread} ({metric['n']})".strip()
            one.append(Text.assemble(mean, f" {spread}" if spread else ""))
            two.append(Text.assemble(mean, f"\n{spread}" if spread else ""))
        return _Column(display_label(column, self.labels), one, two)

    def _reference_columns(self) -> list[list[_Column]]:
        """One group (published, Δ) per metric with a published value: a group is never split."""
        groups = []
        for metric, published_header, difference_header in reference_headers(self.summaries, self.labels):
            published = [Text(format_number(s.get("reference", {}).get(metric))) for s in self.summaries]
            differences = [s.get("difference", {}).get(metric) for s in self.summaries]
            difference = [Text("–" if d is None else f"{d:+.2f}") for d in differences]
            groups.append(
                [
                    _Column(published_header, published, published),
                    _Column(difference_header, difference, difference),
                ]
            )
        return groups

    def _status_column(self) -> _Column | None:
        """Only when a method did not finish: ``ok``, ``failed`` or ``failed 1 of 3``."""
        if all(summary["status"] == "ok" for summary in self.summaries):
            return None
        cells = [Text(_short_status(s["status"]), style="" if s["status"] == "ok" else "red") for s in self.summaries]
        return _Column("status", cells, cells)

    def _caption(self) -> str:
        parts = ["* best of the column (lowest for ECE, NLL and losses)"]
        if repeated(self.summaries):
            fewer = any(
                metric["n"] < summary["repeats"] for summary in self.summaries for metric in summary["metrics"].values()
            )
            parts.append("mean ±sample std over the seeds" + (" ((n): seeds averaged, where not all)" if fewer else ""))
        if reference_columns(self.summaries):
            parts.append("published: the run's reference; Δ = ours − published")
        return "; ".join(parts)

    # -- layout -----------------------------------------------------------------------------------

    def _table(self, columns: Sequence[_Column], wrap: bool, two_lines: bool, first: bool, last: bool) -> Table:
        table = Table(
            title=Text(self.title) if first else None,
            title_justify="left",
            caption=self._caption() if last else None,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
            padding=(0, 1),
        )
        if self.experiments is not None:
            table.add_column("experiment", no_wrap=True, overflow="fold")
        table.add_column("run", style="bold", no_wrap=True, overflow="fold")
        for column in columns:
            cells = column.two_lines if two_lines else column.one_line
            header = column.header
            if wrap:  # as wide as the widest cell (or word of the header): "acc@1" over "(%)"
                lines = [line for cell in cells for line in cell.plain.split("\n")] + header.split()
                widest = max(cell_len(line) for line in lines)
                header = "\n".join(textwrap.wrap(header, widest, break_long_words=False, break_on_hyphens=False))
            table.add_column(Text(header), justify="left" if column.header == "status" else "right")
        for index, summary in enumerate(self.summaries):
            row = [Text(str(summary["run"]))]
            last_of_group = True
            if self.experiments is not None:  # each experiment's name once, a gap after its rows
                experiment = self.experiments[index]
                row.insert(0, Text(experiment if index == 0 or self.experiments[index - 1] != experiment else ""))
                last_of_group = index + 1 < len(self.experiments) and self.experiments[index + 1] != experiment
            row += [(column.two_lines if two_lines else column.one_line)[index] for column in columns]
            table.add_row(*row, end_section=self.experiments is not None and last_of_group)
        return table

    @staticmethod
    def _width(console: Console, options: ConsoleOptions, table: Table) -> int:
        return Measurement.get(console, options.update_width(_NATURAL), table).maximum

    def _layouts(self, console: Console, options: ConsoleOptions) -> Iterator[Table | Text]:
        best = best_means(self.summaries, summary_columns(self.summaries))
        groups: list[list[_Column]] = [[self._metric_column(c, best)] for c in summary_columns(self.summaries)]
        groups += self._reference_columns()
        status = self._status_column()
        if status is not None:
            groups.append([status])
        columns = [column for group in groups for column in group]
        fits = options.max_width
        for wrap, two_lines in ((False, False), (True, False), (True, True)):
            table = self._table(columns, wrap, two_lines, first=True, last=True)
            if self._width(console, options, table) <= fits:
                yield table
                return
        # Still too wide: the metric columns are spread over several tables, each with the run column.
        parts: list[list[_Column]] = [[]]
        for group in groups:
            trial = self._table(parts[-1] + group, True, True, first=False, last=False)
            if parts[-1] and self._width(console, options, trial) > fits:
                parts.append([])
            parts[-1] += group
        for number, part in enumerate(parts):
            if number:
                yield Text("")
            yield self._table(part, True, True, first=number == 0, last=number == len(parts) - 1)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self._layouts(console, options)
        for index, summary in enumerate(self.summaries):
            if summary["status"] != "ok":
                where = f"{self.experiments[index]}: " if self.experiments is not None else ""
                yield Text(f"{where}{summary['run']}: {summary['status']}", style="red")


def console_table(
    rows: Sequence[dict[str, Any]], title: str = "results (last epoch)", labels: Mapping[str, str] | None = None
) -> ResultsTable:
    """One row per method, as the Markdown table, fitted to the console it is printed on."""
    return ResultsTable(rows, title=title, labels=labels)


def render_text(renderable: Any, width: int = 100) -> str:
    """``renderable`` as plain text, as a console ``width`` columns wide would show it (no colours, no
    trailing spaces)."""
    console = Console(width=width, record=True, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(renderable)
    return "".join(line.rstrip() + "\n" for line in console.export_text().splitlines())
