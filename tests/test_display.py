"""What a person sees: the results table at 80 columns, progress with and without a terminal, quiet runs,
the notes about missing plots and ignored bf16, and the Results object a notebook gets."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from test_engine import tiny_config

import ibcore
from ibcore.engine.progress import ProgressDisplay
from ibcore.report import PLOTS_HINT, completed_epochs, render_run_dir
from ibcore.report.console import console_table, render_text
from ibcore.report.summary import summarise

QUICKSTART_RUNS = [
    "ce",
    "ce+posthoc_logit_adjustment",
    "cb_focal",
    "ldam_drw",
    "balanced_softmax",
    "cb_sampling",
    "remix",
]
LABELS = {
    "acc1": "acc@1 (%)",
    "many_acc": "many (%)",
    "medium_acc": "medium (%)",
    "few_acc": "few (%)",
    "balanced_acc": "balanced (%)",
    "ece": "ece (%)",
}


def quickstart_rows(seeds: list[int], **overrides: Any) -> list[dict[str, Any]]:
    """Rows shaped like the quickstart's: seven methods, six metrics, values with two digits before the point."""
    rows = []
    for index, method in enumerate(QUICKSTART_RUNS):
        for seed in seeds:
            metrics = {key: 40.0 + 7.31 * index + 1.17 * seed + 0.5 * k for k, key in enumerate(LABELS)}
            run = method if len(seeds) == 1 else f"{method}@seed{seed}"
            rows.append({"run": run, "method": method, "seed": seed, "status": "ok", "epoch": 24, **metrics})
    for run, changes in overrides.items():
        next(row for row in rows if row["run"] == run).update(changes)
    return rows


def at_80_columns(rows: list[dict[str, Any]]) -> str:
    title = "results after 24 epochs (runs/quickstart-20250101-120000)"
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(console_table(rows, title=title, labels=LABELS))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    return text


def test_the_quickstart_table_fits_80_columns_with_every_run_name_whole() -> None:
    text = at_80_columns(quickstart_rows([0]))
    lines = text.splitlines()
    for run in QUICKSTART_RUNS:
        assert any(line.startswith(run + " ") for line in lines), run  # never "ce+pos…" or folded
    assert "…" not in text
    # one table, headers wrapped at their spaces: "acc@1" over "(%)"
    assert sum("acc@1" in line for line in lines) == 1 and "balanced" in text
    row = next(line for line in lines if line.startswith("ce+posthoc_logit_adjustment "))
    assert row.split()[1:] == ["47.31", "47.81", "48.31", "48.81", "49.31", "49.81"]


def test_mean_and_std_stay_readable_at_80_columns() -> None:
    rows = quickstart_rows([0, 1, 2])
    text = at_80_columns(rows)
    assert "…" not in text
    lines = text.splitlines()
    for run in QUICKSTART_RUNS:
        assert any(line.startswith(run + " ") for line in lines), run
    # the mean on the method's line, "±std" whole below it (n is left out when every seed was averaged)
    (summary,) = [s for s in summarise(rows) if s["run"] == "cb_focal"]
    acc = summary["metrics"]["acc1"]
    index = next(i for i, line in enumerate(lines) if line.startswith("cb_focal "))
    assert f"{acc['mean']:.2f}" in lines[index] and f"±{acc['std']:.2f}" in lines[index + 1]
    assert "mean ±sample std over the seeds" in " ".join(text.split())
    # on a wide console the same cell fits on one line
    wide = render_text(console_table(rows, labels=LABELS), width=160)
    assert f"{acc['mean']:.2f} ±{acc['std']:.2f}" in wide


def test_failures_and_published_values_at_80_columns_keep_every_name_and_status_whole() -> None:
    failed = "failed: non-finite loss at epoch 3, batch 17"
    reference = {"source": "a paper", "acc1": 50.0, "few_acc": 30.0}
    rows = quickstart_rows([0, 1, 2], **{"ldam_drw@seed2": {"status": failed}, "ce@seed0": {"reference": reference}})
    for row in rows:
        if row["method"] == "ce":
            row["reference"] = reference
    text = at_80_columns(rows)
    assert "…" not in text
    lines = text.splitlines()
    # too wide for one table: the columns are spread over several, each starting with the run column
    assert sum(line.startswith("run ") for line in lines) >= 2
    for run in QUICKSTART_RUNS:
        assert sum(line.startswith(run + " ") for line in lines) >= 2, run
    assert "failed 1 of 3" in text
    assert "ldam_drw: failed 1 of 3 (seed 2: non-finite loss at epoch 3, batch 17)" in text  # in full, below
    assert "acc@1 (%)" in " ".join(text.split()) and "published" in text


def render_tasks(display: ProgressDisplay) -> list[str]:
    """The two bars as an 80-column console shows them."""
    assert display.progress is not None
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    console.print(display.progress.make_tasks_table(display.progress.tasks))
    return console.export_text().splitlines()


def test_on_a_terminal_the_bars_keep_counts_and_eta_at_80_columns(tmp_path: Path) -> None:
    terminal = Console(width=80, force_terminal=True, file=io.StringIO())
    display = ProgressDisplay(quiet=False, log_path=tmp_path / "train.log", console=terminal)
    assert display.live
    summary = "0.5s, 4650 img/s; loss " + " ".join(f"run{i}=1.2345" for i in range(20))  # longer than a line
    try:
        for epoch in range(2):
            display.start_epoch(epoch, 200, 391)
            for _ in range(391):
                display.advance(128)
            display.end_epoch(epoch, 200, 0.5, summary)
        display.start_epoch(2, 200, 391)
        for _ in range(17):
            display.advance(128)
        epochs, batches = render_tasks(display)
    finally:
        display.stop()
    clock = re.compile(r"(\d+:\d\d:\d\d|-:--:--)")
    assert epochs.startswith("epochs") and "2/200" in epochs and len(clock.findall(epochs)) == 2
    assert batches.startswith("batches") and "17/391" in batches and len(clock.findall(batches)) == 2
    assert "━" in epochs and "━" in batches  # the bars are there
    assert "epoch 2/200: 0.5s" in (tmp_path / "train.log").read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_progress_line_comes_every_interval_of_work(tmp_path: Path) -> None:
    out = io.StringIO()
    clock = FakeClock()
    display = ProgressDisplay(
        quiet=False,
        log_path=tmp_path / "train.log",
        console=Console(file=out, width=80),
        progress_every_s=60.0,
        clock=clock,
    )
    assert not display.live
    display.start_epoch(4, 200, 100)
    for _ in range(100):
        clock.now += 10.0  # ten seconds per batch: a line every six batches
        display.advance(128)
    display.end_epoch(4, 200, 1000.0, "1000.0s")
    lines = out.getvalue().splitlines()
    progress = [line for line in lines if ": batch " in line]
    assert [int(re.search(r"batch (\d+)/100", line).group(1)) for line in progress] == list(range(6, 100, 6))
    assert progress[0] == "epoch 5/200: batch 6/100 (6%), 13 img/s, 1:00 elapsed, 15:40 left"
    assert lines[-1] == "epoch 5/200: 1000.0s"
    assert ": batch " not in (tmp_path / "train.log").read_text()  # progress is for the console, not the log


def test_without_a_terminal_a_progress_line_can_come_every_n_batches(tmp_path: Path) -> None:
    out = io.StringIO()
    display = ProgressDisplay(
        quiet=False,
        log_path=tmp_path / "train.log",
        console=Console(file=out, width=80),
        progress_every_batches=25,
        clock=FakeClock(),  # time stands still: only the batch count triggers lines
    )
    display.start_epoch(0, 3, 100)
    for _ in range(100):
        display.advance(64)
    assert re.findall(r"batch (\d+)/100", out.getvalue()) == ["25", "50", "75"]


def test_quiet_prints_nothing_and_the_log_file_gets_everything(tmp_path: Path) -> None:
    out = io.StringIO()
    display = ProgressDisplay(quiet=True, log_path=tmp_path / "train.log", console=Console(file=out), clock=FakeClock())
    display.log("[red]run 'x' stopped: non-finite loss at epoch 1, batch 4[/red]; the other runs go on")
    display.start_epoch(0, 1, 10)
    for _ in range(10):
        display.advance(8)
    display.end_epoch(0, 1, 1.0, "1.0s")
    display.print("the results table")
    assert out.getvalue() == ""
    log = (tmp_path / "train.log").read_text()
    assert "run 'x' stopped: non-finite loss at epoch 1, batch 4; the other runs go on" in log
    assert "epoch 1/1: 1.0s" in log


def test_ibcore_run_quiet_is_silent_and_results_serve_a_notebook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = ibcore.run(tiny_config(), out_dir=tmp_path, quiet=True)
    assert capsys.readouterr() == ("", "")  # no table, no log line
    assert "epoch 2/2:" in (results.run_dir / "train.log").read_text()
    # rows per run, the summary per method, the metrics over epochs, the table as text
    assert results.runs == ["ce", "focal"] and results.row("ce")["epoch"] == 2
    assert [m["run"] for m in results.summary] == ["ce", "focal"]
    curve = results.metrics("ce")
    assert [m["epoch"] for m in curve] == [1, 2] and all(0 <= m["acc1"] <= 100 for m in curve)
    assert curve[-1]["acc1"] == results.row("ce")["acc1"]
    assert [m["epoch"] for m in results.metrics("ce", split="train")] == [1, 2]
    lines = [json.loads(line) for line in (results.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert results.history == lines
    with pytest.raises(KeyError, match="no run 'cee'"):
        results.metrics("cee")
    table = results.table()
    assert table.splitlines()[0] == "results (last epoch)" and "acc@1 (%)" in table
    assert re.search(rf"^ce +{results.row('ce')['acc1']:.2f}", table, re.MULTILINE)
    assert repr(results) == f"Results({str(results.run_dir)!r}, 2 rows)\n{table}"


def test_without_matplotlib_the_run_says_once_which_extra_adds_plots_and_bf16_on_the_cpu_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    results = ibcore.run(tiny_config(epochs=1, precision="bf16"), out_dir=tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    log = (results.run_dir / "train.log").read_text()
    assert out.count(PLOTS_HINT) == 1 and log.count(PLOTS_HINT) == 1
    assert 'pip install -e ".[plots]"' in PLOTS_HINT and 'pip install "ibcore[plots]"' in PLOTS_HINT
    assert not list(results.run_dir.glob("*.png")) and (results.run_dir / "results.md").is_file()
    bf16 = "trainer.precision is bf16, but bf16 autocast is used only on CUDA: on cpu training and evaluation run in"
    bf16 += " fp32"
    assert log.count(bf16) == 1 and out.count(bf16) == 1
    # `ib report` says it too
    report = io.StringIO()
    render_run_dir(results.run_dir, console=Console(file=report, width=200))
    assert PLOTS_HINT in report.getvalue()


def test_metrics_of_an_older_run_directory_are_read_with_epochs_counted_as_completed() -> None:
    old = [{"split": "train", "run": "ce", "epoch": 0, "train_loss": 2.0}, {"split": "test", "run": "ce", "epoch": 0}]
    assert [line["epoch"] for line in completed_epochs(old, {})] == [1, 1]  # meta.json without metrics_format
    new = [{**line, "epoch": 1} for line in old]
    assert completed_epochs(new, {"metrics_format": 2}) == new
