"""``report.html``: one self-contained page of a run directory, to open in any browser or send to a colleague.

The page is made from the run directory's files alone (``results.json``, ``metrics.jsonl``, ``meta.json``,
``config.yaml``): the results tables (the columns of ``results.md``, the best of each column marked), the
figures of :mod:`ibcore.report.plots` as inline PNG images, the resolved config and the environment. It loads
nothing from the network and runs no JavaScript. Without matplotlib (the ``plots`` extra) the page has
everything but the figures and says how to add them.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ibcore.errors import IbError
from ibcore.files import atomic_write_text
from ibcore.report.labels import display_label
from ibcore.report.plots import (
    accuracy_figure,
    calibration_figure,
    confusion_figure,
    figure_png,
    headline_metric,
    loss_figure,
    matplotlib_available,
    per_class_figure,
    reliability_recorded,
    shot_figure,
    stage_starts_from_config,
)
from ibcore.report.summary import format_number, summarise
from ibcore.report.tables import (
    best_means,
    metric_columns,
    reference_headers,
    repeated,
    summary_cells,
    summary_columns,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_NAME = "report.html"
FIGURES_HINT = (
    "Figures are missing because matplotlib is not installed: `pip install 'ibcore[plots]'` "
    '(or `pip install -e ".[plots]"` in a clone), then `ib report RUN_DIR --html` draws them.'
)
_BEST = "\x00"  # prefix of a cell that holds the best value of its column
_ENVIRONMENT = (
    ("ibcore", "ibcore"),
    ("torch", "torch"),
    ("python", "Python"),
    ("platform", "platform"),
    ("device", "device"),
    ("device_name", "device name"),
    ("git_commit", "git commit"),
    ("git", "git"),
    ("seed", "seed"),
    ("seeds", "seeds"),
    ("num_classes", "classes"),
    ("class_counts", "training images per class"),
    ("fused_groups", "fused groups"),
    ("distributed", "distributed"),
    ("smoke", "smoke run"),
)
_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0; background: #fafafa; color: #1d1d1f; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 1.5rem 4rem; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin-top: 1.5rem; }
.lede { color: #555; margin-top: 0; }
nav ul { padding-left: 1.2rem; columns: 2; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5rem .8rem; }
.missing { background: #f3f3f6; border-left: 4px solid #9a9aa8; padding: .5rem .8rem; color: #333; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th { background: #f2f2f5; position: sticky; top: 0; }
th:first-child, td:first-child { text-align: left; }
td.status, th.status { text-align: left; }
tbody tr:nth-child(even) { background: #fafafc; }
td.best { font-weight: 700; background: #e6f4ea; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; margin-top: .3rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .82rem; border: 1px solid #e3e3e3; }
table.environment th { text-align: left; background: none; position: static; }
table.environment td { text-align: left; white-space: normal; }
code { font-size: .9em; }
@media print { main { max-width: none; } nav { display: none; } figure { break-inside: avoid; } }
"""


def write_html_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from the run directory's files; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, render_html_report(run_dir))
    return path


def render_html_report(run_dir: Path) -> str:
    """The text of ``report.html`` for ``run_dir`` (see :func:`write_html_report`)."""
    from ibcore.report import completed_epochs, read_metrics

    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise IbError(f"{results_path} does not exist; is {run_dir} a finished ibcore run directory?")
    try:
        payload = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IbError(f"cannot read the results of {run_dir}: {exc}") from exc
    if not isinstance(payload, dict):
        raise IbError(f"{results_path} is not a mapping; the file is damaged or not ibcore's")
    meta = _read_json(run_dir / "meta.json")
    config_text, config = _read_config(run_dir / "config.yaml")
    metrics = completed_epochs(read_metrics(run_dir / "metrics.jsonl"), meta)
    labels = payload.get("labels")
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    rows = _rows(payload.get("last"))
    best_rows = _rows(payload.get("best_on_validation"))
    class_counts = [int(n) for n in meta.get("class_counts", []) if isinstance(n, int)]
    report = _Report(run_dir, rows, metrics, class_counts, stage_starts_from_config(config), labels)

    title = f"ibcore report: {run_dir.name}"
    body = [f"<h1>{_e(title)}</h1>", _lede(run_dir, rows, meta, config)]
    if meta.get("smoke"):
        body.append(
            f'<p class="warning">A smoke run (<code>--smoke {_e(meta["smoke"])}</code>): '
            "its numbers mean nothing; it only shows that the experiment runs.</p>"
        )
    sections = [("results", "Results"), ("figures", "Figures"), ("config", "Config"), ("environment", "Environment")]
    body.append("<nav><ul>" + "".join(f'<li><a href="#{i}">{_e(t)}</a></li>' for i, t in sections) + "</ul></nav>")
    body += _results_section(payload, rows, best_rows, labels)
    body += report.figures_section()
    body += _config_section(config_text)
    body += _environment_section(meta, run_dir)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
    )


# -- reading ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_config(path: Path) -> tuple[str | None, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError:
        return text, None


def _rows(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [row for row in value if isinstance(row, dict) and isinstance(row.get("run"), str)]


def _summaries(stored: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """results.json's summaries when they are well formed, else computed again from the per-seed rows."""
    keys = ("run", "metrics", "status", "repeats")
    if isinstance(stored, list) and stored and all(isinstance(s, dict) and all(k in s for k in keys) for s in stored):
        if all(isinstance(s["metrics"], dict) for s in stored):
            return stored
    return summarise(rows)


# -- page parts ------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _lede(run_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any], config: Any) -> str:
    parts = []
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if isinstance(trainer, dict) and isinstance(trainer.get("epochs"), int):
        parts.append(f"{trainer['epochs']} epochs")
    dataset = config.get("data", {}).get("dataset", {}) if isinstance(config, dict) else {}
    if isinstance(dataset, dict) and dataset.get("name"):
        parts.append(f"data set <code>{_e(dataset['name'])}</code>")
    parts.append(f"{len(rows)} result rows")
    if meta.get("device"):
        name = f" ({meta['device_name']})" if meta.get("device_name") else ""
        parts.append(f"trained on <code>{_e(meta['device'])}</code>{_e(name)}")
    return (
        f'<p class="lede">{", ".join(parts)}. Made from <code>results.json</code>, <code>metrics.jsonl</code>, '
        f"<code>meta.json</code> and <code>config.yaml</code> of the run directory <code>{_e(run_dir.name)}</code>; "
        "the page is self-contained (no network, no scripts).</p>"
    )


def _table(table_id: str, header: list[tuple[str, str, str]], lines: list[list[str]]) -> str:
    """An HTML table; ``header`` holds (text, data-key, css class), cells are pre-rendered ``<td>``s."""
    head = "".join(
        "<th" + (f' data-key="{_e(key)}"' if key else "") + (f' class="{css}"' if css else "") + f">{_e(text)}</th>"
        for text, key, css in header
    )
    rows = "".join("<tr>" + "".join(cells) + "</tr>\n" for cells in lines)
    return (
        f'<div class="table-wrap"><table id="{_e(table_id)}">\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{rows}</tbody>\n</table></div>"
    )


def _cell(text: str, value: Any = None, css: str = "") -> str:
    best = text.startswith(_BEST)
    text = text.removeprefix(_BEST)
    classes = " ".join(c for c in (css, "best" if best else "") if c)
    attributes = f' class="{classes}"' if classes else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        attributes += f' data-value="{value!r}"'
    content = f"<strong>{_e(text)}</strong>" if best else _e(text)
    return f"<td{attributes}>{content}</td>"


def _summary_table(table_id: str, summaries: list[dict[str, Any]], labels: Mapping[str, str]) -> list[str]:
    """The table of results.md: one row per method, the best of each column marked, published values beside."""
    columns = summary_columns(summaries)
    references = reference_headers(summaries, labels)
    best = best_means(summaries, columns)
    header = [("run", "run", ""), ("epoch", "epoch", "")]
    header += [(display_label(c, labels), c, "") for c in columns]
    for metric, published, difference in references:
        header += [(published, f"{metric}_published", ""), (difference, f"{metric}_difference", "")]
    header.append(("status", "status", "status"))
    mark: Callable[[str], str] = lambda text: _BEST + text  # noqa: E731
    lines = []
    for summary in summaries:
        texts = summary_cells(summary, columns, references, best, mark)
        cells = [_cell(str(summary["run"])), _cell(format_number(summary.get("epoch")), summary.get("epoch"))]
        for column, text in zip(columns, texts, strict=False):
            metric = summary["metrics"].get(column)
            cells.append(_cell(text, metric.get("mean") if isinstance(metric, dict) else None))
        for k, (metric, _, _) in enumerate(references):
            published = summary.get("reference", {}).get(metric)
            difference = summary.get("difference", {}).get(metric)
            cells.append(_cell(texts[len(columns) + 2 * k], published))
            cells.append(_cell(texts[len(columns) + 2 * k + 1], difference))
        cells.append(_cell(str(summary.get("status", "")), css="status"))
        lines.append(cells)
    notes = [
        "Percentages are in percent. <strong>Bold</strong> on green: the best value of the column among "
        "finished runs (lowest for ECE, NLL and losses)."
    ]
    if repeated(summaries):
        notes.append("Cells read mean ± sample standard deviation (number of seeds averaged).")
    if references:
        notes.append("published: the value the run's <code>reference</code> gives; Δ = ours − published.")
    parts = [_table(table_id, header, lines), f"<p>{' '.join(notes)}</p>"]
    sources = [(s["run"], s["reference"].get("source")) for s in summaries if isinstance(s.get("reference"), dict)]
    sources = [(run, source) for run, source in sources if source]
    if sources:
        items = "".join(f"<li><code>{_e(run)}</code>: {_e(source)}</li>" for run, source in sources)
        parts.append(f"<p>Published values:</p><ul>{items}</ul>")
    return parts


def _seed_table(table_id: str, rows: list[dict[str, Any]], labels: Mapping[str, str]) -> str:
    """Per-seed rows, as measured (the ``Per seed`` table of results.md)."""
    columns = metric_columns(rows)
    header = [("run", "run", ""), ("seed", "seed", ""), ("epoch", "epoch", "")]
    header += [(display_label(c, labels), c, "") for c in columns] + [("status", "status", "status")]
    lines = []
    for row in rows:
        cells = [_cell(str(row["run"])), _cell(format_number(row.get("seed"))), _cell(format_number(row.get("epoch")))]
        cells += [_cell(format_number(row.get(c)), row.get(c)) for c in columns]
        cells.append(_cell(str(row.get("status", "")), css="status"))
        lines.append(cells)
    return _table(table_id, header, lines)


def _results_section(
    payload: dict[str, Any], rows: list[dict[str, Any]], best_rows: list[dict[str, Any]], labels: Mapping[str, str]
) -> list[str]:
    parts = ['<section id="results">', "<h2>Results</h2>"]
    if not rows:
        parts += ['<p class="missing">results.json holds no result rows.</p>', "</section>"]
        return parts
    summaries = _summaries(payload.get("summary"), rows)
    epoch = max((s["epoch"] for s in summaries if isinstance(s.get("epoch"), int)), default=None)
    parts.append("<h3>Last epoch" + (f" (after {epoch} epochs)" if epoch is not None else "") + "</h3>")
    parts += _summary_table("results-last", summaries, labels)
    if repeated(summaries):
        parts += ["<h3>Last epoch, per seed</h3>", _seed_table("results-last-per-seed", rows, labels)]
    if best_rows:
        best = _summaries(payload.get("summary_best_on_validation"), best_rows)
        parts += ["<h3>Best epoch, selected on the validation split</h3>"]
        parts += _summary_table("results-best-on-validation", best, labels)
    else:
        parts.append(
            "<p>The numbers are those of the last epoch; no epoch was chosen by looking at test data "
            "(a best-epoch table needs a validation split).</p>"
        )
    parts.append("</section>")
    return parts


class _Report:
    """The figures of a run directory, each as an inline PNG, or a line that says why it is missing."""

    def __init__(
        self,
        run_dir: Path,
        rows: list[dict[str, Any]],
        metrics: list[dict[str, Any]],
        class_counts: list[int],
        stage_starts: dict[str, list[int]],
        labels: dict[str, str],
    ) -> None:
        self.run_dir, self.rows, self.metrics = run_dir, rows, metrics
        self.class_counts, self.stage_starts, self.labels = class_counts, stage_starts, labels

    def figures_section(self) -> list[str]:
        parts = ['<section id="figures">', "<h2>Figures</h2>"]
        if not matplotlib_available():
            parts += [f'<p class="missing" id="figures-missing">{_e(FIGURES_HINT)}</p>', "</section>"]
            return parts
        rows, metrics, starts = self.rows, self.metrics, self.stage_starts
        key = headline_metric(metrics, rows)
        tested = any(line.get("split") == "test" for line in metrics)
        staged = (
            " Stage starts (<code>runs[].stages[].from_epoch</code>) are marked ▼ with a dotted line: "
            "the stage trains from the next epoch on."
            if starts
            else ""
        )
        parts.append("<h3>Learning curves</h3>")
        parts.append(
            self._figure(
                "loss_curves",
                "Training loss against epoch",
                loss_figure(metrics, starts, rows),
                "Training loss of every run against epoch, one panel per run with its own y scale: losses of "
                "different methods differ in scale (LDAM's s=30 puts its loss far above cross-entropy's)." + staged,
                'metrics.jsonl has no training-loss lines (split "train").',
            )
        )
        parts.append(
            self._figure(
                "accuracy_curves",
                f"Test {display_label(key, self.labels) if key else 'headline metric'} against epoch",
                accuracy_figure(metrics, starts, rows, self.labels, key),
                f"Test {_e(display_label(key, self.labels)) if key else ''} at every evaluation (every "
                "<code>eval_every</code> epochs and after the last), one line per run and post-hoc variant." + staged,
                "metrics.jsonl has no test evaluations with a metric where higher is better."
                if tested
                else "metrics.jsonl has no test evaluations.",
            )
        )
        parts.append("<h3>Per class and per shot group</h3>")
        has_per_class = any(isinstance(r.get("per_class_acc"), list) for r in rows)
        parts.append(
            self._figure(
                "per_class_accuracy",
                "Per-class accuracy against training-set size",
                per_class_figure(rows, self.class_counts, metrics),
                "Last-epoch test accuracy of every class against its number of training images (log scale), "
                "one line per run: the tail classes are on the left.",
                "Per-class accuracy is not shown: meta.json has no <code>class_counts</code>."
                if has_per_class
                else "Per-class accuracy is not shown: the run did not record per-class accuracies. Add "
                "<code>{name: per_class_accuracy}</code> to the config's <code>evaluators</code>.",
            )
        )
        parts.append(
            self._figure(
                "shot_accuracy",
                "Many-, medium- and few-shot accuracy",
                shot_figure(rows, self.labels),
                "Mean per-class test accuracy of the many-, medium- and few-shot classes (grouped by their "
                "number of training images); a group without classes has no bar and reads n/a.",
                "Shot-group accuracies are not shown: the run did not record them. Add "
                "<code>{name: shot_accuracy}</code> to the config's <code>evaluators</code>.",
            )
        )
        parts.append("<h3>Calibration</h3>")
        if reliability_recorded(rows):
            caption = (
                "Reliability diagram of every run at the last epoch: accuracy in each confidence bin (bars), the "
                "bin's mean confidence (dots) and perfect calibration (dashed)."
            )
        else:
            caption = (
                "No reliability diagram: the <code>ece</code> evaluator records only the expected calibration "
                "error, not the per-bin counts and accuracies a reliability diagram needs. Shown instead: what "
                "is recorded, the ECE of every run at every evaluation."
            )
        parts.append(
            self._figure(
                "calibration",
                "Calibration",
                calibration_figure(metrics, rows),
                caption,
                "Calibration is not shown: the run did not measure it. Add <code>{name: ece}</code> to the "
                "config's <code>evaluators</code>.",
            )
        )
        parts.append("<h3>Confusion matrices</h3>")
        parts.append(
            self._figure(
                "confusion_matrix",
                "Confusion matrices",
                confusion_figure(rows),
                "Last-epoch confusion matrix of every run, each row normalised to 100% of its true class: the "
                "diagonal is each class's accuracy, the rest of a row shows which classes took its images.",
                "Confusion matrices are not shown: the run did not record them. Add "
                "<code>{name: confusion_matrix}</code> to the config's <code>evaluators</code>.",
            )
        )
        parts.append("</section>")
        return parts

    @staticmethod
    def _figure(name: str, title: str, figure: Figure | None, caption: str, missing: str) -> str:
        """``caption`` and ``missing`` are HTML (they hold ``<code>``); ``title`` is text."""
        if figure is None:
            return f'<p class="missing" id="fig-{name}-missing">{missing}</p>'
        data = base64.b64encode(figure_png(figure, dpi=110)).decode("ascii")
        return (
            f'<figure id="fig-{name}"><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )


def _config_section(config_text: str | None) -> list[str]:
    parts = ['<section id="config">', "<h2>Config</h2>"]
    if config_text is None:
        parts.append('<p class="missing">The run directory has no config.yaml.</p>')
    else:
        parts.append(
            "<p>The experiment as it was trained (<code>config.yaml</code>: defaults merged into every run, every "
            "setting written out). <code>ib run config.yaml</code> repeats it.</p>"
        )
        parts.append(f'<pre id="config-yaml">{_e(config_text)}</pre>')
    parts.append("</section>")
    return parts


def _show(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def _environment_section(meta: dict[str, Any], run_dir: Path) -> list[str]:
    parts = ['<section id="environment">', "<h2>Environment</h2>"]
    if not meta:
        parts += ['<p class="missing">The run directory has no readable meta.json.</p>', "</section>"]
        return parts
    lines = [
        f"<tr><th>{_e(label)}</th><td>{_e(_show(meta[key]))}</td></tr>"
        for key, label in _ENVIRONMENT
        if key in meta and (meta[key] not in ("", None) or key in ("device_name",))
    ]
    origin = _read_json(run_dir / "origin.json")
    if isinstance(origin.get("config"), str):
        lines.append(f"<tr><th>config file</th><td>{_e(origin['config'])}</td></tr>")
    if not any(key in meta for key in ("git_commit", "git")):
        lines.append("<tr><th>git commit</th><td>not recorded in the run directory</td></tr>")
    parts.append('<table class="environment" id="environment-table"><tbody>' + "".join(lines) + "</tbody></table>")
    parts.append(
        "<details><summary>meta.json in full</summary>"
        f'<pre id="meta-json">{_e(json.dumps(meta, indent=2, default=str))}</pre></details>'
    )
    parts.append("</section>")
    return parts
