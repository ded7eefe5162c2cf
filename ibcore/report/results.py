"""What ``ibcore.run`` returns: the run directory, the rows of the results tables and the metrics over epochs.

Plain lists of dicts, so a notebook needs nothing beyond the standard library (``pandas.DataFrame(
results.rows)`` works too).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ibcore.report.console import console_table, render_text
from ibcore.report.summary import summarise

_LINE_KEYS = ("split", "run")


@dataclasses.dataclass(repr=False)
class Results:
    """The outcome of an experiment.

    - ``run_dir``: the run directory (``results.md``, ``metrics.jsonl``, ... see docs/outputs.md);
    - ``rows``: the last-epoch row of every run and seed (and post-hoc variant): ``run``, ``method``,
      ``seed``, ``status``, ``epoch`` and every metric by its key (``acc1``, ``many_acc``, ...);
    - ``best_rows``: the rows selected on the validation split (empty without one);
    - ``history``: every line of ``metrics.jsonl`` (``split``, ``run``, ``epoch`` and the values);
    - ``labels``: metric key -> the column header the tables show (``acc1`` -> ``acc@1 (%)``).
    """

    run_dir: Path
    rows: list[dict[str, Any]]
    best_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def row(self, run: str) -> dict[str, Any]:
        """The last-epoch row of one run (``ce``, ``ce@seed1``, ``ce+tau_norm``)."""
        for row in self.rows:
            if row["run"] == run:
                return row
        raise KeyError(f"no run {run!r}; the runs are {', '.join(r['run'] for r in self.rows)}")

    @property
    def summary(self) -> list[dict[str, Any]]:
        """One entry per method: every metric as mean, sample std and n over its seeds (``ibcore.report.summary``)."""
        return summarise(self.rows)

    @property
    def runs(self) -> list[str]:
        """The names of the rows, in the order of the config."""
        return [row["run"] for row in self.rows]

    def metrics(self, run: str, split: str = "test") -> list[dict[str, Any]]:
        """The metrics of ``run`` over epochs, one dict per evaluation (``split`` "test" or "val") or per
        epoch (``split="train"``: ``train_loss``, ``lr``, ``seconds``), each with its ``epoch``: the number
        of epochs completed when it was measured."""
        if run not in {line.get("run") for line in self.history}:
            known = sorted({str(line.get("run")) for line in self.history})
            raise KeyError(f"no run {run!r} in the metrics; they hold {', '.join(known)}")
        return [
            {k: v for k, v in line.items() if k not in _LINE_KEYS}
            for line in self.history
            if line.get("run") == run and line.get("split") == split
        ]

    def table(self, width: int = 100) -> str:
        """The per-method summary as text, as the console shows it ``width`` columns wide."""
        return render_text(console_table(self.rows, labels=self.labels), width=width).rstrip("\n")

    def __repr__(self) -> str:
        return f"Results({str(self.run_dir)!r}, {len(self.rows)} rows)\n{self.table()}"

    def __str__(self) -> str:
        return self.table()
