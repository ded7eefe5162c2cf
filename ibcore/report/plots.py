"""Figures of a run directory, as PNG files (``write_plots``) and inside the HTML report (:mod:`ibcore.report.html`).

They need the ``plots`` extra (matplotlib); without it they are skipped and the run says once which extra adds
them (:data:`PLOTS_HINT`). Each figure has a builder (``loss_figure``, ``accuracy_figure``, ...) that returns a
matplotlib ``Figure``, or None when the run directory holds nothing to draw; ``build_figures`` calls them all.
The builders never touch pyplot's global state, so they are safe to call from a library or a notebook.

The figures read the metrics of the built-in evaluators when they are there (``per_class_acc``,
``many_acc``/``medium_acc``/``few_acc``, ``ece``, ``confusion_matrix``); epochs on the x axis count
completed epochs, as everywhere, and a stage's ``from_epoch: E`` is marked at E: it trains from epoch E + 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ibcore.files import atomic_writer
from ibcore.report.labels import display_label
from ibcore.report.tables import lower_is_better, metric_columns

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_HINT = (
    "plots skipped: matplotlib is not installed; "
    '`pip install -e ".[plots]"` in a clone (or `pip install "ibcore[plots]"`) adds them, '
    "then `ib report RUN_DIR` draws them"
)

# The file stem of each figure, in the order they are drawn and shown.
FIGURE_NAMES = (
    "loss_curves",
    "accuracy_curves",
    "per_class_accuracy",
    "shot_accuracy",
    "calibration",
    "confusion_matrix",
)
SHOT_GROUPS = ("many_acc", "medium_acc", "few_acc")
_DPI = 120
_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- what the figures are drawn from -------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (a missing, null, NaN or non-numeric value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def stage_starts_from_config(config: Any) -> dict[str, list[int]]:
    """Config run name -> the ``from_epoch`` of each of its stages (from a resolved config.yaml's ``runs``)."""
    starts: dict[str, list[int]] = {}
    runs = config.get("runs") if isinstance(config, Mapping) else None
    for run in runs if isinstance(runs, list) else []:
        if not isinstance(run, Mapping) or not isinstance(run.get("name"), str):
            continue
        stages = run.get("stages")
        stages = stages if isinstance(stages, list) else []
        epochs = [s["from_epoch"] for s in stages if isinstance(s, Mapping) and isinstance(s.get("from_epoch"), int)]
        if epochs:
            starts[run["name"]] = sorted(epochs)
    return starts


def read_stage_starts(run_dir: Path) -> dict[str, list[int]]:
    """:func:`stage_starts_from_config` of ``run_dir/config.yaml``; empty when it is missing or unreadable."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return stage_starts_from_config(config)


def read_labels(run_dir: Path) -> dict[str, str]:
    """The display labels (metric key -> label) kept in ``run_dir/results.json``; empty without them."""
    import json

    try:
        labels = json.loads((run_dir / "results.json").read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def stages_of(run: str, stage_starts: Mapping[str, Sequence[int]]) -> list[int]:
    """The stage starts of a metrics ``run`` (``ce``, ``ce@seed1``, ``ce+tau_norm``): those of the config run it
    comes from, the longest config name it starts with."""
    matches = [name for name in stage_starts if run == name or run.startswith((f"{name}@", f"{name}+"))]
    return list(stage_starts[max(matches, key=len)]) if matches else []


def headline_metric(metrics: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The metric the accuracy curves show: ``acc1`` or ``balanced_acc`` when measured, else the first scalar
    metric of the results where higher is better (as the engine's fallback)."""
    measured = [dict(row) for row in rows] or [dict(m) for m in metrics if m.get("split") == "test"]
    columns = metric_columns(measured)
    tested = {key for line in metrics if line.get("split") == "test" for key in line}
    columns = [c for c in columns if c in tested] or columns
    preferred: list[str] = [c for c in ("acc1", "balanced_acc") if c in columns]
    candidates = preferred or [c for c in columns if not lower_is_better(c)]
    return candidates[0] if candidates else None


def run_order(metrics: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every run name, in the order of the results (the config's), then any only the metrics know."""
    names = [str(row["run"]) for row in rows if isinstance(row.get("run"), str)]
    for line in metrics:
        if isinstance(line.get("run"), str) and line["run"] not in names:
            names.append(line["run"])
    return names


def run_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour, line style and marker per run that stay distinct beyond 10 runs: tab20's strong colours, then
    its light ones, then the same colours again with dashed, dotted and dash-dotted lines and other markers."""
    from matplotlib import colormaps

    colours = list(colormaps["tab20"].colors)  # type: ignore[attr-defined]
    ordered = colours[0::2] + colours[1::2]
    styles = {}
    for index, name in enumerate(names):
        cycle = index // len(ordered)
        styles[name] = {
            "color": ordered[index % len(ordered)],
            "linestyle": _LINE_STYLES[cycle % len(_LINE_STYLES)],
            "marker": _MARKERS[cycle % len(_MARKERS)],
        }
    return styles


def _curves(metrics: Sequence[Mapping[str, Any]], split: str, key: str) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in metrics:
        value = _number(line.get(key))
        if line.get("split") == split and isinstance(line.get("run"), str) and value is not None:
            curves.setdefault(line["run"], []).append((int(line["epoch"]), value))
    return {run: sorted(points) for run, points in curves.items()}


# -- figure helpers -------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A figure that is not registered with pyplot (no global state), laid out so outside legends fit."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _legend_outside(ax: Axes, entries: int) -> None:
    """The legend to the right of the axes, never over the data; in columns of at most 20 entries."""
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        fontsize="small",
        ncol=max(1, math.ceil(entries / 20)),
        frameon=False,
    )


def _panels(count: int, width: float = 3.2, height: float = 2.5) -> tuple[Figure, list[Axes]]:
    """A grid of ``count`` small panels (at most 4 across); the unused cells of the last row are removed."""
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure = _figure(width * columns, height * rows + 0.5)
    grid = figure.subplots(rows, columns, squeeze=False)
    axes = [ax for line in grid for ax in line]
    for ax in axes[count:]:
        ax.remove()
    return figure, axes[:count]


def _epoch_axis(ax: Axes, label: str = "epochs completed") -> None:
    """Epochs on the x axis: whole-number ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _mark_stages(ax: Axes, starts: Sequence[int], style: Mapping[str, Any], label: str | None) -> None:
    """A dotted vertical line in the run's colour at each stage start, with a triangle on the top edge."""
    for number, epoch in enumerate(starts):
        ax.axvline(epoch, color=style["color"], linestyle=":", linewidth=1.2, alpha=0.8)
        ax.plot(
            [epoch],
            [1.0],
            marker="v",
            color=style["color"],
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            linestyle="",
            label=label if number == 0 else None,
        )


# -- the figures ----------------------------------------------------------------------------------------------


def loss_figure(
    metrics: Sequence[Mapping[str, Any]],
    stage_starts: Mapping[str, Sequence[int]] | None = None,
    rows: Sequence[Mapping[str, Any]] = (),
) -> Figure | None:
    """Training loss against epoch, one small panel per run, each with its own y scale (LDAM's s=30 loss is
    ten times cross-entropy's); stage starts marked."""
    curves = _curves(metrics, "train", "train_loss")
    if not curves:
        return None
    names = [n for n in run_order(metrics, rows) if n in curves]
    styles = run_styles(run_order(metrics, rows))
    status = {str(r.get("run")): str(r.get("status", "ok")) for r in rows}
    figure, axes = _panels(len(names))
    for ax, run in zip(axes, names, strict=True):
        points = curves[run]
        style = styles[run]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=style["color"],
            linestyle=style["linestyle"],
            marker=style["marker"],
            markersize=3,
        )
        starts = stages_of(run, stage_starts or {})
        if starts:
            _mark_stages(ax, starts, style, None)
        failed = status.get(run, "ok") != "ok"
        ax.set_title(f"{run} (failed)" if failed else run, fontsize="medium", pad=8)
        _epoch_axis(ax, "epoch")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    note = "; ▼ and dotted line: a stage starts after that epoch" if stage_starts else ""
    figure.suptitle(f"Training loss per run (each panel has its own y scale{note})")
    return figure


def accuracy_figure(
    metrics: Sequence[Mapping[str, Any]],
    stage_starts: Mapping[str, Sequence[int]] | None = None,
    rows: Sequence[Mapping[str, Any]] = (),
    labels: Mapping[str, str] | None = None,
    key: str | None = None,
) -> Figure | None:
    """The test headline metric (``acc1``) against epoch, one line per run and post-hoc variant, markers at
    every evaluation (a single evaluation is a visible point); each run's stage starts marked in its colour."""
    key = key or headline_metric(metrics, rows)
    curves = _curves(metrics, "test", key) if key else {}
    if not key or not curves:
        return None
    names = [n for n in run_order(metrics, rows) if n in curves]
    styles = run_styles(run_order(metrics, rows))
    figure = _figure(8.5, 4.5)
    ax = figure.subplots()
    for run in names:
        points = curves[run]
        style = styles[run]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=run, markersize=4, **style)
    marked = False
    for run in names:
        starts = stages_of(run, stage_starts or {})
        if starts:
            _mark_stages(ax, starts, styles[run], f"stage starts ({run})")
            marked = True
    label = display_label(key, labels)
    title = f"Test {label} against epoch" + (" (▼ dotted: a stage starts after that epoch)" if marked else "")
    ax.set_title(title, pad=10)
    _epoch_axis(ax)
    ax.set_ylabel(f"test {label}")
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(ax.get_legend_handles_labels()[1]))
    return figure


def per_class_figure(
    rows: Sequence[Mapping[str, Any]], class_counts: Sequence[int], metrics: Sequence[Mapping[str, Any]] = ()
) -> Figure | None:
    """Last-epoch test accuracy of each class against its number of training images (log x), one line per run."""
    per_class = {str(r["run"]): r["per_class_acc"] for r in rows if isinstance(r.get("per_class_acc"), list)}
    if not per_class or not class_counts:
        return None
    styles = run_styles(run_order(metrics, rows))
    figure = _figure(8.5, 4.5)
    ax = figure.subplots()
    for run, accuracies in per_class.items():
        pairs = sorted(
            (n, a)
            for n, a in zip(class_counts, (_number(a) for a in accuracies), strict=False)
            if a is not None and n > 0
        )
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], label=run, markersize=4, alpha=0.85, **styles[run])
    ax.set_xscale("log")
    ax.set_title("Test accuracy of each class against its training images (last epoch)")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax, len(per_class))
    return figure


def shot_figure(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None) -> Figure | None:
    """Many-, medium- and few-shot accuracy of each run as bars; a group without classes (or without a value)
    has no bar and reads "n/a", never a bar at zero."""
    shot_rows = [r for r in rows if any(_number(r.get(g)) is not None for g in SHOT_GROUPS)]
    if not shot_rows:
        return None
    found = (r["shot_groups"] for r in shot_rows if isinstance(r.get("shot_groups"), Mapping))
    groups_of: Mapping[str, Any] = next(found, {})
    figure = _figure(max(6.5, 1.1 * len(shot_rows) + 2.5), 4.5)
    ax = figure.subplots()
    width = 0.8 / len(SHOT_GROUPS)
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c")
    for k, group in enumerate(SHOT_GROUPS):
        name = group.removesuffix("_acc")
        members = groups_of.get(name)
        legend = display_label(group, labels) + (f", {len(members)} classes" if isinstance(members, list) else "")
        positions: list[float] = []
        values: list[float] = []
        missing: list[float] = []
        for i, row in enumerate(shot_rows):
            value = _number(row.get(group))
            (missing if value is None else positions).append(i + k * width)
            if value is not None:
                values.append(value)
        ax.bar(positions, values, width=width, label=legend, color=colours[k])
        for x in missing:
            ax.text(x, 1.0, "n/a", ha="center", va="bottom", rotation=90, fontsize="small", color="0.35")
    ax.set_xticks([i + width for i in range(len(shot_rows))])
    ax.set_xticklabels([str(r["run"]) for r in shot_rows], rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0, 105)
    ax.set_title("Many-, medium- and few-shot test accuracy (last epoch; n/a: the group has no classes)")
    ax.set_xlabel("run")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    _legend_outside(ax, len(SHOT_GROUPS))
    return figure


def reliability_recorded(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some row holds per-bin calibration counts (``ece_bins``: ``count``, ``confidence`` and
    ``accuracy`` lists, the last two in percent), which a reliability diagram needs."""
    return any(_bins(row) is not None for row in rows)


def _bins(row: Mapping[str, Any]) -> tuple[list[int], list[float | None], list[float | None]] | None:
    bins = row.get("ece_bins")
    if not isinstance(bins, Mapping):
        return None
    count, confidence, accuracy = bins.get("count"), bins.get("confidence"), bins.get("accuracy")
    if not (isinstance(count, list) and isinstance(confidence, list) and isinstance(accuracy, list)):
        return None
    if not count or not len(count) == len(confidence) == len(accuracy):
        return None
    return [int(_number(c) or 0) for c in count], [_number(c) for c in confidence], [_number(a) for a in accuracy]


def calibration_figure(metrics: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]] = ()) -> Figure | None:
    """A reliability diagram per run when the rows hold per-bin counts (``ece_bins``); otherwise what is there:
    the expected calibration error of every run against epoch."""
    binned = [(str(r["run"]), b) for r in rows if (b := _bins(r)) is not None]
    if binned:
        figure, axes = _panels(len(binned), 3.0, 3.0)
        for ax, (run, (count, confidence, accuracy)) in zip(axes, binned, strict=True):
            edges = [100.0 * i / len(count) for i in range(len(count) + 1)]
            centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
            shown = [(c, a, conf) for c, a, conf, n in zip(centres, accuracy, confidence, count, strict=True) if n > 0]
            ax.bar([s[0] for s in shown], [s[1] or 0.0 for s in shown], width=100.0 / len(count), color="#1f77b4")
            ax.plot([0, 100], [0, 100], color="0.4", linestyle="--", linewidth=1)
            dots = [(s[0], s[2]) for s in shown if s[2] is not None]
            ax.plot([d[0] for d in dots], [d[1] for d in dots], color="#d62728", marker="o", markersize=3, linestyle="")
            ece = next((_number(r.get("ece")) for r in rows if r.get("run") == run), None)
            ax.set_title(run + (f" (ECE {ece:.2f}%)" if ece is not None else ""), fontsize="medium")
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 100)
            ax.set_xlabel("confidence (%)")
            ax.set_ylabel("accuracy (%)")
        figure.suptitle("Reliability diagrams (last epoch): bars = accuracy per confidence bin, dots = mean confidence")
        return figure
    curves = _curves(metrics, "test", "ece")
    if not curves:
        return None
    styles = run_styles(run_order(metrics, rows))
    names = [n for n in run_order(metrics, rows) if n in curves]
    figure = _figure(8.5, 4.5)
    ax = figure.subplots()
    for run in names:
        ax.plot([p[0] for p in curves[run]], [p[1] for p in curves[run]], label=run, markersize=4, **styles[run])
    ax.set_title(
        "Expected calibration error against epoch (lower is better)\n"
        "no reliability diagram: the runs recorded no per-bin counts (ece_bins)",
        fontsize="medium",
    )
    _epoch_axis(ax)
    ax.set_ylabel("test ECE (%)")
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(names))
    return figure


def _normalised(matrix: Any) -> list[list[float]] | None:
    """A confusion matrix as row percentages (of each true class); a class without test samples is NaN."""
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        return None
    if any(len(r) != len(matrix) for r in matrix):
        return None
    result = []
    for line in matrix:
        values = [_number(v) or 0.0 for v in line]
        total = sum(values)
        result.append([100.0 * v / total if total > 0 else math.nan for v in values])
    return result


def confusion_figure(rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """The last-epoch confusion matrix of every run (the ``confusion_matrix`` evaluator), normalised per true
    class: the diagonal is each class's accuracy, a row shows where that class's images went."""
    matrices = [(str(r["run"]), m) for r in rows if (m := _normalised(r.get("confusion_matrix"))) is not None]
    if not matrices:
        return None
    figure, axes = _panels(len(matrices), 3.3, 3.1)
    image = None
    for ax, (run, matrix) in zip(axes, matrices, strict=True):
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="Blues", interpolation="nearest")
        classes = len(matrix)
        if classes <= 10:
            for i, line in enumerate(matrix):
                for j, value in enumerate(line):
                    if not math.isnan(value) and value >= 0.5:
                        colour = "white" if value > 60 else "black"
                        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6, color=colour)
            ax.set_xticks(range(classes))
            ax.set_yticks(range(classes))
            ax.tick_params(labelsize=6)
        ax.set_title(run, fontsize="medium")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    if image is not None:
        bar = figure.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label("% of the true class")
    figure.suptitle("Confusion matrices, normalised per true class (last epoch)")
    return figure


def build_figures(
    metrics: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    class_counts: Sequence[int],
    stage_starts: Mapping[str, Sequence[int]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Figure]:
    """Every figure there is data for, by file stem (:data:`FIGURE_NAMES`, in that order)."""
    built = {
        "loss_curves": loss_figure(metrics, stage_starts, rows),
        "accuracy_curves": accuracy_figure(metrics, stage_starts, rows, labels),
        "per_class_accuracy": per_class_figure(rows, class_counts, metrics),
        "shot_accuracy": shot_figure(rows, labels),
        "calibration": calibration_figure(metrics, rows),
        "confusion_matrix": confusion_figure(rows),
    }
    return {name: figure for name, figure in built.items() if figure is not None}


def figure_png(figure: Figure, dpi: int = _DPI) -> bytes:
    """The figure as PNG bytes (outside legends included)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def write_plots(
    run_dir: Path,
    metrics: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    class_counts: Sequence[int],
    stage_starts: Mapping[str, Sequence[int]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[Path]:
    """Every figure of :func:`build_figures` as ``run_dir/<name>.png``. Returns the files.

    ``stage_starts`` (config run name -> stage ``from_epoch`` values) defaults to those of ``run_dir/config.yaml``.
    """
    if not matplotlib_available():
        return []
    if stage_starts is None:
        stage_starts = read_stage_starts(run_dir)
    if labels is None:
        labels = read_labels(run_dir)
    written = []
    for name, figure in build_figures(metrics, rows, class_counts, stage_starts, labels).items():
        written.append(run_dir / f"{name}.png")
        _save(figure, written[-1])
    return written


def _save(figure: Figure, path: Path) -> None:
    """Write a PNG atomically: a full disk leaves no partial or 0-byte plot, and the error names the file."""
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", dpi=_DPI, metadata={"Software": None})
