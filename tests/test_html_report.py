"""report.html (one self-contained page of a run directory) and the figures it shares with the PNG plots.

A tiny experiment (two runs, one with a stage, every evaluator a figure needs) is trained once; the tests read
the page back with the standard library's HTML parser, as a colleague's browser would see it. A real-browser
check runs when a chromium is installed.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from test_engine import tiny_config

import ibcore
from ibcore.errors import IbError
from ibcore.report import html as html_report
from ibcore.report import write_tables
from ibcore.report.html import FIGURES_HINT, write_html_report
from ibcore.report.summary import format_cell, summarise
from ibcore.report.tables import best_means, summary_columns

FIGURES = ("loss_curves", "accuracy_curves", "per_class_accuracy", "shot_accuracy", "calibration", "confusion_matrix")
PNG = b"\x89PNG\r\n\x1a\n"


def experiment() -> dict[str, Any]:
    """Two epochs, two runs; ``focal`` starts a stage after epoch 1; every evaluator a figure reads."""
    config = tiny_config(epochs=2)
    config["runs"] = [
        {"name": "ce"},
        {
            "name": "focal",
            "loss": {"name": "focal", "params": {"gamma": 1.0}},
            "stages": [{"from_epoch": 1, "loss": {"name": "focal", "params": {"gamma": 2.0}}}],
        },
    ]
    config["evaluators"] = [
        {"name": "accuracy"},
        {"name": "shot_accuracy"},
        {"name": "per_class_accuracy"},
        {"name": "ece"},
        {"name": "confusion_matrix"},
    ]
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory (trained once for the module; copy it before changing it)."""
    results = ibcore.run(experiment(), out_dir=tmp_path_factory.mktemp("runs"), quiet=True)
    return Path(results.run_dir)


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the trained run directory, without any report.html."""
    copy = tmp_path / trained.name
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoints", "report.html"))
    return copy


class Page(HTMLParser):
    """Every start tag with its attributes, the tables by id (rows of cells: attributes and text), all text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.tables: dict[str, list[list[tuple[dict[str, str], str]]]] = {}
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: tuple[dict[str, str], list[str]] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = (attributes, [])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell[1].append(data)

    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def attributes(self, tag: str) -> Iterator[dict[str, str]]:
        return (attributes for name, attributes in self.tags if name == tag)

    def by_id(self, element_id: str) -> tuple[str, dict[str, str]] | None:
        return next(((t, a) for t, a in self.tags if a.get("id") == element_id), None)

    def image_in(self, figure_id: str) -> bytes:
        """The PNG bytes of the image inside ``<figure id=figure_id>`` (the first ``img`` after it)."""
        start = self.tags.index(next(item for item in self.tags if item[1].get("id") == figure_id))
        tag, attributes = next(item for item in self.tags[start:] if item[0] == "img")
        prefix = "data:image/png;base64,"
        assert attributes["src"].startswith(prefix), attributes["src"][:60]
        return base64.b64decode(attributes["src"][len(prefix) :], validate=True)


def read(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


# -- the page ---------------------------------------------------------------------------------------------------


def test_the_report_is_one_self_contained_file_that_loads_nothing(run_dir: Path) -> None:
    before = {p.name for p in run_dir.iterdir()}
    path = write_html_report(run_dir)
    assert path == run_dir / "report.html"
    assert {p.name for p in run_dir.iterdir()} == before | {"report.html"}  # one file, nothing beside it
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert not any(tag in ("script", "link", "iframe", "object", "embed", "base") for tag, _ in page.tags)
    for tag, attributes in page.tags:
        for name in ("src", "href", "srcset", "data", "poster"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:50]}> points outside the page"
    assert [a["charset"] for a in page.attributes("meta") if "charset" in a] == ["utf-8"]


def test_the_table_holds_the_numbers_of_results_json_with_the_best_of_each_column_marked(run_dir: Path) -> None:
    page = read(write_html_report(run_dir))
    payload = json.loads((run_dir / "results.json").read_text())
    summaries = {s["run"]: s for s in payload["summary"]}
    header, *rows = page.tables["results-last"]
    keys = [attributes["data-key"] for attributes, _ in header]
    columns = summary_columns(payload["summary"])
    assert keys == ["run", "epoch", *columns, "status"]
    assert [text for _, text in header][2] == payload["labels"]["acc1"]  # display labels head the columns
    assert {"acc1", "many_acc", "few_acc", "ece"} <= set(columns)
    assert [cells[0][1] for cells in rows] == [row["run"] for row in payload["last"]] == ["ce", "focal"]
    best = best_means(payload["summary"], columns)
    for cells in rows:
        summary = summaries[cells[0][1]]
        assert int(cells[1][1]) == summary["epoch"] == 2
        assert cells[-1][1] == summary["status"] == "ok"
        for key, (attributes, text) in zip(keys[2:-1], cells[2:-1], strict=True):
            metric = summary["metrics"].get(key)
            if metric is None:
                assert text == "–" and "data-value" not in attributes
                continue
            assert float(attributes["data-value"]) == metric["mean"]  # in full, as results.json has it
            assert text == format_cell(metric, False) and float(text) == pytest.approx(metric["mean"], abs=0.005)
            assert ("best" in attributes.get("class", "").split()) == (best[key] == metric["mean"])
    # lowest is best for ECE, highest for accuracy
    ece_column = keys.index("ece")
    marked = [cells[0][1] for cells in rows if "best" in cells[ece_column][0].get("class", "")]
    assert marked == [min(summaries, key=lambda run: summaries[run]["metrics"]["ece"]["mean"])]


def test_every_figure_is_in_the_page_as_an_inline_png(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    page = read(write_html_report(run_dir))
    for name in FIGURES:
        assert page.by_id(f"fig-{name}") is not None, f"figure {name} is missing"
        assert page.by_id(f"fig-{name}-missing") is None
        png = page.image_in(f"fig-{name}")
        assert png.startswith(PNG)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.05
    text = page.all_text()
    # the ece evaluator records its bins (ece_bins): the page draws a reliability diagram per run
    assert "No reliability diagram" not in text


def test_config_and_environment_are_in_the_page(run_dir: Path) -> None:
    page = read(write_html_report(run_dir))
    text = page.all_text()
    config = (run_dir / "config.yaml").read_text()
    assert " ".join(config.split()) in text
    meta = json.loads((run_dir / "meta.json").read_text())
    environment = {cells[0][1]: cells[1][1] for cells in page.tables["environment-table"]}
    assert environment["torch"] == meta["torch"] and environment["ibcore"] == meta["ibcore"]
    assert environment["device"] == meta["device"] == "cpu" and environment["Python"] == meta["python"]
    assert environment["git commit"] == "not recorded in the run directory"
    meta["git_commit"] = "0123abc"
    (run_dir / "meta.json").write_text(json.dumps(meta))
    environment = {cells[0][1]: cells[1][1] for cells in read(write_html_report(run_dir)).tables["environment-table"]}
    assert environment["git commit"] == "0123abc"


def test_without_matplotlib_the_page_keeps_the_tables_and_says_how_to_add_the_figures(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(html_report, "matplotlib_available", lambda: False)
    page = read(write_html_report(run_dir))
    assert not list(page.attributes("img")) and not list(page.attributes("figure"))
    assert len(page.tables["results-last"]) == 1 + 2
    assert page.by_id("config-yaml") is not None and "environment-table" in page.tables
    assert "pip install 'ibcore[plots]'" in FIGURES_HINT and " ".join(FIGURES_HINT.split()) in page.all_text()


def test_a_run_without_an_evaluator_says_which_one_its_figure_needs(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    payload = json.loads((run_dir / "results.json").read_text())
    for row in payload["last"]:
        del row["per_class_acc"], row["confusion_matrix"]
    (run_dir / "results.json").write_text(json.dumps(payload))
    page = read(write_html_report(run_dir))
    for name in ("per_class_accuracy", "confusion_matrix"):
        assert page.by_id(f"fig-{name}") is None
        assert page.by_id(f"fig-{name}-missing") is not None
    text = page.all_text()
    assert "Add {name: per_class_accuracy} to the config's evaluators" in text
    assert "Add {name: confusion_matrix} to the config's evaluators" in text
    assert page.by_id("fig-shot_accuracy") is not None  # the others are still there


def test_methods_repeated_over_seeds_read_mean_and_std_with_the_per_seed_rows_below(tmp_path: Path) -> None:
    rows = [
        {"run": f"ce@seed{s}", "method": "ce", "seed": s, "status": "ok", "epoch": 4, "acc1": a, "ece": e}
        for s, a, e in ((0, 70.0, 5.0), (1, 72.0, 6.0), (2, 74.5, 4.0))
    ]
    reference = {"acc1": 74.0, "source": "Their paper, Table 2"}
    rows += [
        {
            "run": "ls",
            "method": "ls",
            "seed": 0,
            "status": "ok",
            "epoch": 4,
            "acc1": 75.0,
            "ece": 9.0,
            "reference": reference,
        }
    ]
    write_tables(tmp_path, rows, labels={"acc1": "acc@1 (%)"})
    page = read(write_html_report(tmp_path))  # no meta.json, metrics.jsonl or config.yaml: said, not fatal
    header, ce, ls = page.tables["results-last"]
    summary = {s["run"]: s for s in summarise(rows)}
    acc = summary["ce"]["metrics"]["acc1"]
    assert ce[2][1] == format_cell(acc, True) == "72.17 ± 2.25 (3)" and float(ce[2][0]["data-value"]) == acc["mean"]
    assert ls[2][1] == "75.00" and "best" in ls[2][0]["class"] and "best" in ce[3][0]["class"]
    assert [attributes["data-key"] for attributes, _ in header][-3:] == ["acc1_published", "acc1_difference", "status"]
    assert [text for _, text in ls[-3:]] == ["74.00", "+1.00", "ok"] and [text for _, text in ce[-3:-1]] == ["–", "–"]
    assert [cells[0][1] for cells in page.tables["results-last-per-seed"][1:]] == [r["run"] for r in rows]
    text = page.all_text()
    assert "mean ± sample standard deviation" in text
    assert "no config.yaml" in text and "no readable meta.json" in text and "ls : Their paper, Table 2" in text


def test_a_directory_without_results_json_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IbError, match="results.json does not exist"):
        write_html_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def _browser() -> str | None:
    return next(
        (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
    )


def test_a_real_browser_renders_the_page_without_console_errors(run_dir: Path, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH: the real-browser check needs one")
    matplotlib_image = pytest.importorskip("matplotlib.image")
    page = write_html_report(run_dir)
    screenshot = tmp_path / "screenshot.png"
    command = [
        browser,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,2000",
        "--enable-logging=stderr",
        "--v=0",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    log = done.stdout + done.stderr
    console = [
        line
        for line in log.splitlines()
        if "CONSOLE" in line or "Failed to load resource" in line or "net::ERR_" in line
    ]
    assert not console, "\n".join(console)
    assert screenshot.is_file(), f"no screenshot (exit code {done.returncode}):\n{log[-3000:]}"
    pixels = matplotlib_image.imread(str(screenshot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"


# -- the figures (PNG and page alike) ---------------------------------------------------------------------------


def _figures(run_dir: Path) -> dict[str, Any]:
    from ibcore.report import completed_epochs, read_metrics
    from ibcore.report.plots import build_figures, read_labels, read_stage_starts

    rows = json.loads((run_dir / "results.json").read_text())["last"]
    meta = json.loads((run_dir / "meta.json").read_text())
    metrics = completed_epochs(read_metrics(run_dir / "metrics.jsonl"), meta)
    return build_figures(metrics, rows, meta["class_counts"], read_stage_starts(run_dir), read_labels(run_dir))


def test_every_figure_has_a_title_and_axis_labels(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    figures = _figures(run_dir)
    assert list(figures) == list(FIGURES)
    for name, figure in figures.items():
        suptitle = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
        for ax in figure.axes:
            if ax.get_label() == "<colorbar>":
                assert ax.get_ylabel() or ax.get_xlabel(), f"{name}: the colour bar says what it shows"
                continue
            assert ax.get_title() or suptitle, f"{name}: an axes without a title"
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: an axes without axis labels"


def test_write_plots_writes_every_figure_and_the_confusion_matrix(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report import read_metrics, write_plots

    for png in run_dir.glob("*.png"):
        png.unlink()
    rows = json.loads((run_dir / "results.json").read_text())["last"]
    counts = json.loads((run_dir / "meta.json").read_text())["class_counts"]
    written = write_plots(run_dir, read_metrics(run_dir / "metrics.jsonl"), rows, counts)
    assert [p.name for p in written] == [f"{name}.png" for name in FIGURES]
    assert all(p.read_bytes().startswith(PNG) for p in written)


def test_stage_starts_are_marked_on_the_accuracy_and_loss_curves(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    figures = _figures(run_dir)
    (ax,) = figures["accuracy_curves"].axes
    vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
    assert [list(line.get_xdata()) for line in vertical] == [[1, 1]]  # focal: from_epoch 1
    assert "stage starts (focal)" in ax.get_legend_handles_labels()[1]
    loss_axes = {ax.get_title(): ax for ax in figures["loss_curves"].axes}
    assert set(loss_axes) == {"ce", "focal"}
    marks = lambda ax: [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2 and len(set(ln.get_xdata())) == 1]  # noqa: E731
    assert len(marks(loss_axes["focal"])) == 1 and not marks(loss_axes["ce"])


def test_stages_belong_to_the_seeds_and_post_hoc_variants_of_their_run() -> None:
    from ibcore.report.plots import stage_starts_from_config, stages_of

    starts = stage_starts_from_config(
        {"runs": [{"name": "ce", "stages": []}, {"name": "ldam", "stages": [{"from_epoch": 160}, {"from_epoch": 80}]}]}
    )
    assert starts == {"ldam": [80, 160]}
    assert stages_of("ldam@seed2", starts) == stages_of("ldam+tau_norm@seed1", starts) == [80, 160]
    assert stages_of("ldam_drw", starts) == stages_of("ce", starts) == []


def test_losses_of_different_scales_get_their_own_axes() -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report.plots import loss_figure

    metrics = [{"split": "train", "run": "ce", "epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    metrics += [{"split": "train", "run": "ldam", "epoch": e, "train_loss": 30.0 / e} for e in (1, 2, 3)]
    figure = loss_figure(metrics)
    assert figure is not None
    ce, ldam = figure.axes
    assert ce.get_ylim()[1] < 2 < 20 < ldam.get_ylim()[1]  # ce's curve is not flattened by LDAM's scale


def test_a_curve_of_one_evaluation_is_visible_as_a_marker() -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report.plots import accuracy_figure, loss_figure

    metrics = [{"split": "train", "run": "ce", "epoch": 1, "train_loss": 2.0}]
    metrics += [{"split": "test", "run": "ce", "epoch": 1, "acc1": 40.0}]
    for figure in (loss_figure(metrics), accuracy_figure(metrics)):
        assert figure is not None
        (line,) = [ln for ax in figure.axes for ln in ax.get_lines()]
        assert list(line.get_xdata()) == [1] and line.get_marker() not in (None, "", " ", "None")


def test_an_empty_shot_group_has_no_bar_and_reads_n_a() -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report.plots import shot_figure

    groups = {"many": [0, 1], "medium": [2, 3], "few": []}  # no class has few enough images
    rows = [
        {"run": run, "many_acc": m, "medium_acc": 80.0, "few_acc": None, "shot_groups": groups}
        for run, m in (("ce", 95.0), ("ls", 92.0))
    ]
    figure = shot_figure(rows, {"few_acc": "few (%)"})
    assert figure is not None
    (ax,) = figure.axes
    heights = [patch.get_height() for patch in ax.patches]
    assert sorted(heights) == [80.0, 80.0, 92.0, 95.0]  # two groups x two runs; no bar for "few", not a zero
    assert [t.get_text() for t in ax.texts] == ["n/a", "n/a"]
    assert "few (%), 0 classes" in ax.get_legend_handles_labels()[1]


def test_colours_stay_distinct_beyond_ten_and_twenty_runs() -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report.plots import run_styles

    styles = run_styles([f"run{i}" for i in range(60)])
    looks = [(tuple(s["color"]), s["linestyle"], s["marker"]) for s in styles.values()]
    assert len(set(looks)) == 60
    assert len({tuple(s["color"]) for s in list(styles.values())[:20]}) == 20  # 20 colours before a style repeats


def test_legends_sit_outside_the_data(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for name, figure in _figures(run_dir).items():
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in figure.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, name


def test_a_reliability_diagram_is_drawn_when_per_bin_counts_are_recorded() -> None:
    pytest.importorskip("matplotlib")
    from ibcore.report.plots import calibration_figure, reliability_recorded

    bins = {"count": [0, 5, 20, 75], "confidence": [None, 40.0, 62.0, 90.0], "accuracy": [None, 20.0, 60.0, 95.0]}
    rows = [{"run": "ce", "ece": 4.2, "ece_bins": bins}]
    assert reliability_recorded(rows) and not reliability_recorded([{"run": "ce", "ece": 4.2}])
    figure = calibration_figure([], rows)
    assert figure is not None
    (ax,) = figure.axes
    assert sorted(round(p.get_height()) for p in ax.patches) == [20, 60, 95]  # the empty bin has no bar
    assert ax.get_title() == "ce (ECE 4.20%)" and ax.get_xlabel() == "confidence (%)"


def test_a_normalised_confusion_matrix_per_run() -> None:
    pytest.importorskip("matplotlib")
    import numpy as np

    from ibcore.report.plots import confusion_figure

    rows = [
        {"run": "ce", "confusion_matrix": [[8, 2, 0], [1, 3, 0], [0, 0, 0]]},
        {"run": "ls", "confusion_matrix": [[5, 5, 0], [0, 4, 0], [0, 1, 1]]},
    ]
    figure = confusion_figure(rows)
    assert figure is not None
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["ce", "ls"]
    matrix = panels[0].get_images()[0].get_array()
    assert matrix[0].tolist() == [80.0, 20.0, 0.0] and matrix[1].tolist() == [25.0, 75.0, 0.0]
    assert np.ma.getmaskarray(matrix)[2].all()  # a class without test images is blank, not "0 %"
