"""``ib compare`` and ``--format``: several experiments in one table, and tables to paste into a README or a paper.

Three tiny experiments are trained once for the module: ``lt_baseline`` (one seed), ``seeded_runs`` (two seeds
and one more metric, ECE) on the same data, and ``other_data`` on a different data set.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_array_file import make_arrays, write
from test_engine import tiny_config

import ibcore
from ibcore.report.formats import latex_escape
from ibcore.report.summary import format_number
from ibcore.report.tables import lower_is_better

Cli = Callable[..., Any]
SEEDED_COLUMNS = ["acc1", "many_acc", "medium_acc", "few_acc", "ece"]


def _train(config: dict[str, Any], root: Path, name: str) -> Path:
    """Train ``config`` and give its run directory a fixed ``name`` (the source column shows it)."""
    results = ibcore.run(config, out_dir=root / "out", quiet=True)
    return Path(results.run_dir).rename(root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    seeded = {
        **tiny_config(epochs=1),
        "seeds": [0, 1],
        "runs": [{"name": "ce"}, {"name": "focal_g1", "loss": {"name": "focal", "params": {"gamma": 1.0}}}],
        "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}, {"name": "ece"}],
    }
    other = {
        "seed": 0,
        "data": {"dataset": {"name": "array_file", "params": {"path": str(write(root / "d.npz", make_arrays()))}}},
        "trainer": {"epochs": 1, "eval_every": 1, "device": "cpu"},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"in_channels": 3, "width": 4}},
            "optimizer": {"name": "sgd", "params": {"lr": 0.05}},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [{"name": "ce"}],
        "evaluators": [{"name": "accuracy"}],
    }
    return {
        "lt_baseline": _train(tiny_config(epochs=1), root, "lt_baseline"),
        "seeded_runs": _train(seeded, root, "seeded_runs"),
        "other_data": _train(other, root, "other_data"),
    }


def results_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {summary["run"]: summary for summary in results_json(run_dir)["summary"]}


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the first Markdown table in ``text``; checks the separator line."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, separator, rows = split[0], split[1], split[2:]
    assert all(re.fullmatch(r"-{3,}:?", cell) for cell in separator), lines[1]
    assert all(len(row) == len(header) for row in rows)
    return header, rows


def latex_rows(text: str) -> list[list[str]]:
    """The cells of each row of the tabular between \\midrule and \\bottomrule."""
    body = text.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    return [[cell.strip() for cell in line.removesuffix("\\\\").split(" & ")] for line in body.splitlines()]


# -- one table of several experiments ---------------------------------------------------------------------


def test_compare_shows_every_method_of_each_experiment_with_its_source_and_its_own_numbers(
    ib_cli: Cli, runs: dict[str, Path]
) -> None:
    baseline, seeded = runs["lt_baseline"], runs["seeded_runs"]
    result = ib_cli("compare", str(baseline), str(seeded), "--format", "csv")
    assert result.rc == 0, result.output
    assert "warning" not in result.err  # same data set, class counts and test split
    table = list(csv.DictReader(io.StringIO(result.out)))
    # the union of the metric columns, in the order of the first experiment; ECE only the second has
    metric_columns = [c.removesuffix("_mean") for c in table[0] if c.endswith("_mean")]
    assert metric_columns == [*results_json(baseline)["summary"][0]["metrics"], "ece"] == SEEDED_COLUMNS
    assert [(row["experiment"], row["method"]) for row in table] == [
        ("lt_baseline", "ce"),
        ("lt_baseline", "focal"),
        ("seeded_runs", "ce"),
        ("seeded_runs", "focal_g1"),
    ]
    # one seed: the row of results.json, in full precision
    for row in table[:2]:
        measured = next(r for r in results_json(baseline)["last"] if r["run"] == row["method"])
        for column in SEEDED_COLUMNS[:4]:
            assert float(row[f"{column}_mean"]) == measured[column]
            assert row[f"{column}_std"] == "" and row[f"{column}_n"] == "1"
        assert row["ece_mean"] == "" and row["seeds"] == "3" and row["status"] == "ok"
    # two seeds: mean, std and n of results.json's summary
    for row in table[2:]:
        summary = summaries(seeded)[row["method"]]
        assert row["seeds"] == "0 1" and row["n"] == "2"
        for column in SEEDED_COLUMNS:
            stats = summary["metrics"][column]
            assert float(row[f"{column}_mean"]) == stats["mean"]
            assert float(row[f"{column}_std"]) == stats["std"]
            assert int(row[f"{column}_n"]) == stats["n"] == 2


def test_on_the_console_each_experiment_is_named_and_the_best_of_each_column_starred(
    ib_cli: Cli, runs: dict[str, Path]
) -> None:
    result = ib_cli("compare", str(runs["lt_baseline"]), str(runs["seeded_runs"]))
    assert result.rc == 0, result.output
    assert "results (last epoch) of 2 experiments" in result.out
    assert re.search(r"experiment\s+run\s+acc@1 \(%\)", result.out)
    assert result.line_with("lt_baseline").split()[:2] == ["lt_baseline", "ce"]  # named once, on its first row
    assert result.line_with("seeded_runs").split()[:2] == ["seeded_runs", "ce"]
    assert result.out.count("lt_baseline") == result.out.count("seeded_runs") == 1
    assert "*" in result.out and "±" in result.out


def test_a_method_repeated_over_seeds_reads_mean_std_and_n_as_ib_report_shows_it(
    ib_cli: Cli, runs: dict[str, Path]
) -> None:
    seeded = runs["seeded_runs"]
    result = ib_cli("compare", str(runs["lt_baseline"]), str(seeded), "--format", "markdown")
    assert result.rc == 0, result.output
    header, rows = markdown_table(result.out)
    assert header[:3] == ["experiment", "run", "acc@1 (%)"] and header[-1] == "ece (%)"
    for row in rows[2:]:
        summary = summaries(seeded)[row[1]]
        for column, cell in zip(SEEDED_COLUMNS, row[2:], strict=True):
            stats = summary["metrics"][column]
            expected = f"{format_number(stats['mean'])} ± {format_number(stats['std'])} (2)"
            assert cell.strip("*") == expected
    baseline_ce = next(r for r in results_json(runs["lt_baseline"])["last"] if r["run"] == "ce")
    assert rows[0][:2] == ["lt_baseline", "ce"]
    assert rows[0][2].strip("*") == format_number(baseline_ce["acc1"])  # a single run: its number, no ± (n)
    assert rows[0][-1] == "–"  # no ECE in that experiment


# -- refusals and warnings --------------------------------------------------------------------------------


def test_a_directory_that_is_not_a_finished_run_is_refused_naming_it_and_the_problem(
    ib_cli: Cli, runs: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs["lt_baseline"] / "config.yaml").read_text())
    baseline = runs["lt_baseline"]
    for bad, problem in [
        (empty, "has no results.json: it is not an ibcore run directory"),
        (unfinished, f"has no results.json: training has not finished (`ib resume {unfinished}` finishes it)"),
        (tmp_path / "missing", "does not exist"),
        (baseline / "results.json", f"is a file, not a run directory: name its folder, {baseline}"),
    ]:
        result = ib_cli("compare", str(runs["lt_baseline"]), str(bad), "--format", "csv")
        assert result.rc == 1
        assert result.out == ""  # no table from part of the experiments
        assert " ".join(result.err.split()) == f"error: {bad}: {problem}"
    # the folder that holds run directories: a hint to name them
    result = ib_cli("compare", str(runs["lt_baseline"].parent))
    assert result.rc == 1 and "holds run directories (lt_baseline, other_data, seeded_runs)" in result.err


def test_experiments_on_different_data_are_compared_with_a_warning_saying_what_differs(
    ib_cli: Cli, runs: dict[str, Path]
) -> None:
    result = ib_cli("compare", str(runs["lt_baseline"]), str(runs["other_data"]), "--format", "markdown")
    assert result.rc == 0, result.output
    assert [row[:2] for row in markdown_table(result.out)[1]] == [
        ["lt_baseline", "ce"],
        ["lt_baseline", "focal"],
        ["other_data", "ce"],
    ]
    assert "warning" not in result.out  # stdout holds the table alone
    warning = result.err
    assert warning.startswith(
        "warning: the experiments differ in dataset, training class counts, test split: "
        "their numbers are not comparable"
    )
    assert "dataset: mnist_lt (lt_baseline) vs array_file (other_data)" in warning

    def described(run_dir: Path) -> str:
        counts = json.loads((run_dir / "meta.json").read_text())["class_counts"]
        return f"{len(counts)} classes, {sum(counts)} images, {max(counts)} to {min(counts)} per class"

    expected = f"{described(runs['lt_baseline'])} (lt_baseline) vs {described(runs['other_data'])} (other_data)"
    assert f"training class counts: {expected}" in warning
    assert "4 classes" in expected  # the array_file data set has 4


# -- formats ----------------------------------------------------------------------------------------------


def test_markdown_is_a_github_table_with_the_best_of_each_column_in_bold(ib_cli: Cli, runs: dict[str, Path]) -> None:
    result = ib_cli("report", str(runs["lt_baseline"]), "--format", "markdown")
    assert result.rc == 0, result.output
    header, rows = markdown_table(result.out)
    assert header == ["run", "acc@1 (%)", "many (%)", "medium (%)", "few (%)"]  # one experiment: no source column
    measured = {row["run"]: row for row in results_json(runs["lt_baseline"])["last"]}
    for column, key in enumerate(SEEDED_COLUMNS[:4], start=1):
        best = max(row[key] for row in measured.values())
        for row in rows:
            value = measured[row[0]][key]
            assert row[column] == (f"**{format_number(value)}**" if value == best else format_number(value))


def test_latex_is_a_booktabs_tabular_with_bold_best_values_and_escaped_names(
    ib_cli: Cli, runs: dict[str, Path]
) -> None:
    seeded = runs["seeded_runs"]
    result = ib_cli("compare", str(runs["lt_baseline"]), str(seeded), "--format", "latex")
    assert result.rc == 0, result.output
    text = result.out
    assert "\\begin{tabular}{llrrrrr}" in text and text.rstrip().endswith("\\end{tabular}")
    assert text.index("\\toprule") < text.index("\\midrule") < text.index("\\bottomrule")
    header = text.split("\\toprule\n", 1)[1].split("\n", 1)[0]
    assert header == "experiment & run & acc@1 (\\%) & many (\\%) & medium (\\%) & few (\\%) & ece (\\%) \\\\"
    rows = latex_rows(text)
    assert [row[:2] for row in rows] == [
        ["lt\\_baseline", "ce"],
        ["lt\\_baseline", "focal"],
        ["seeded\\_runs", "ce"],
        ["seeded\\_runs", "focal\\_g1"],
    ]
    assert not re.search(r"(?<!\\)[_%#]", text.split("\\begin{tabular}", 1)[1])  # nothing left unescaped
    assert all(len(row) == 7 for row in rows)  # every & is a column separator
    # the bold cell of each column is the best mean among the four methods (the lowest for ECE)
    means = {
        ("lt_baseline", summary["run"]): summary["metrics"] for summary in results_json(runs["lt_baseline"])["summary"]
    }
    means.update({("seeded_runs", summary["run"]): summary["metrics"] for summary in results_json(seeded)["summary"]})
    methods = list(means)
    for position, column in enumerate(SEEDED_COLUMNS, start=2):
        values = {method: metrics[column]["mean"] for method, metrics in means.items() if column in metrics}
        best = (min if lower_is_better(column) else max)(values.values())
        bold = [methods[i] for i, row in enumerate(rows) if row[position].startswith("\\textbf{")]
        assert bold == [method for method, value in values.items() if value == best], column
        for method, row in zip(methods, rows, strict=True):
            if method in values and method[0] == "seeded_runs":
                stats = means[method][column]
                mean = format_number(stats["mean"])
                assert row[position].replace("\\textbf{" + mean + "}", mean) == (
                    f"{mean} $\\pm$ {format_number(stats['std'])}"
                )
    assert rows[0][-1] == "--"  # no ECE in lt_baseline


def test_latex_escape_covers_the_special_characters() -> None:
    assert latex_escape("a_b%c&d#e$f{g}h~i^j\\k") == (
        "a\\_b\\%c\\&d\\#e\\$f\\{g\\}h\\textasciitilde{}i\\textasciicircum{}j\\textbackslash{}k"
    )
    assert latex_escape("Δ acc@1 (%)") == "$\\Delta$ acc@1 (\\%)"
    assert latex_escape("[beta=0.9]") == "{[}beta=0.9{]}"  # a row starting with [ is not read as \\[...]


def test_output_writes_the_table_to_a_file_and_its_extension_can_name_the_format(
    ib_cli: Cli, runs: dict[str, Path], tmp_path: Path
) -> None:
    dirs = [str(runs["lt_baseline"]), str(runs["seeded_runs"])]
    on_stdout = ib_cli("compare", *dirs, "--format", "latex").out
    result = ib_cli("compare", *dirs, "--format", "latex", "--output", str(tmp_path / "table.txt"))
    assert result.rc == 0 and result.out == ""
    assert (tmp_path / "table.txt").read_text() == on_stdout
    assert f"wrote {tmp_path / 'table.txt'} (latex)" in " ".join(result.err.split())
    assert [p.name for p in tmp_path.iterdir()] == ["table.txt"]  # no temp file left beside it

    result = ib_cli("compare", *dirs, "-o", str(tmp_path / "table.csv"))  # the format from the extension
    assert result.rc == 0
    assert (tmp_path / "table.csv").read_text() == ib_cli("compare", *dirs, "--format", "csv").out

    result = ib_cli("compare", *dirs, "-o", str(tmp_path / "table"))
    assert result.rc == 1 and "cannot tell the format from its name; give --format" in result.err
    result = ib_cli("compare", *dirs, "-o", str(tmp_path / "no" / "table.md"))
    assert result.rc == 1 and "does not exist" in result.err


def test_report_with_a_format_only_reads_the_run_directory(ib_cli: Cli, runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["seeded_runs"]
    (run_dir / "results.md").unlink()
    result = ib_cli("report", str(run_dir), "--output", str(tmp_path / "results.csv"))
    assert result.rc == 0, result.output
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [row["method"] for row in table] == ["ce", "focal_g1"] and "experiment" not in table[0]
    assert float(table[0]["acc1_mean"]) == summaries(run_dir)["ce"]["metrics"]["acc1"]["mean"]
    assert not (run_dir / "results.md").exists()  # an export writes nothing into the run directory
    assert ib_cli("report", str(run_dir)).rc == 0  # without --format, `ib report` re-renders its files
    assert (run_dir / "results.md").is_file()


def test_experiments_with_the_same_directory_name_are_told_apart_by_their_parents() -> None:
    from ibcore.report.compare import source_names

    paths = [Path("runs/a/quickstart"), Path("runs/b/quickstart"), Path("runs/b/other")]
    assert source_names(paths) == ["a/quickstart", "b/quickstart", "b/other"]
    assert source_names([Path("x/one"), Path("y/two")]) == ["one", "two"]
