"""The results of several experiments in one table (``ib compare``), and the table of one (``ib report --format``).

Each run directory is read from its ``results.json`` (the per-seed rows, summarised per method as ``ib report``
does), its ``meta.json`` (class counts, test-split fingerprint, smoke runs) and its ``config.yaml`` (the data set).
The table has one row per method of each experiment, the union of their metric columns in the order of the first,
and a column naming the experiment (its run directory's name). Numbers measured on different data are not
comparable: the table says so in its ``warnings``. Formatting is in :mod:`ibcore.report.formats`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ibcore.errors import IbError
from ibcore.report.summary import summarise
from ibcore.report.tables import best_means, reference_headers, repeated, summary_columns


class NotARunDirectory(IbError):
    """A path given as a run directory is not a finished one (missing, no ``results.json``, damaged)."""


@dataclasses.dataclass
class RunDirectory:
    """What the tables need from one finished run directory."""

    path: Path
    rows: list[dict[str, Any]]  # results.json's ``last``: one row per run and seed
    labels: dict[str, str]  # metric key -> display label
    meta: dict[str, Any]  # meta.json ({} when it is missing or unreadable)
    dataset: str | None  # config.yaml's data.dataset.name

    @property
    def name(self) -> str:
        return self.path.name


@dataclasses.dataclass
class SummaryTable:
    """One row per method: ``summaries`` (as :func:`ibcore.report.summary.summarise` makes them), with the
    experiment each came from when several run directories are compared (``experiments``, else None)."""

    summaries: list[dict[str, Any]]
    labels: dict[str, str]
    experiments: list[str] | None = None
    title: str = "results (last epoch)"
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """The metric keys: those of the first experiment in its order, then any new ones of the next."""
        return summary_columns(self.summaries)

    @property
    def best(self) -> dict[str, float]:
        """The best mean of each column among the methods whose every seed finished (lowest for ECE, NLL, losses)."""
        return best_means(self.summaries, self.columns)

    @property
    def references(self) -> list[tuple[str, str, str]]:
        """(metric, published header, difference header) for every metric with a published value."""
        return reference_headers(self.summaries, self.labels)

    @property
    def repeated(self) -> bool:
        """Whether some method was trained over several seeds (its cells are mean ± std)."""
        return repeated(self.summaries)

    @property
    def finished(self) -> bool:
        return all(summary["status"] == "ok" for summary in self.summaries)

    def is_best(self, summary: Mapping[str, Any], column: str) -> bool:
        metric = summary["metrics"].get(column)
        return metric is not None and self.best.get(column) == metric["mean"]


# -- reading a run directory ------------------------------------------------------------------------------


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a finished run directory, or None when it has a results.json."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        hint = f": name its folder, {path.parent}" if path.name == "results.json" else ""
        return f"is a file, not a run directory{hint}"
    if (path / "results.json").is_file():
        return None
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        return f"has no results.json: training has not finished (`ib resume {path}` finishes it)"
    inside = sorted(child.name for child in path.iterdir() if (child / "results.json").is_file())
    if inside:
        shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
        return f"has no results.json, but holds run directories ({shown}): name them, e.g. `{path}/*`"
    return "has no results.json: it is not an ibcore run directory"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _dataset_name(run_dir: Path) -> str | None:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        name = config["data"]["dataset"]["name"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def read_run_dir(path: str | Path) -> RunDirectory:
    """The results of a finished run directory; :class:`NotARunDirectory` names the directory and the problem."""
    path = Path(path).expanduser()
    problem = _problem(path)
    if problem is not None:
        raise NotARunDirectory(f"{path}: {problem}")
    results_path = path / "results.json"
    try:
        payload = _read_json(results_path)
    except (OSError, ValueError) as exc:
        raise NotARunDirectory(f"{path}: cannot read results.json: {exc}") from exc
    rows = payload.get("last") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("run"), str) for r in rows):
        raise NotARunDirectory(
            f"{path}: results.json has no list of rows with a 'run' name under 'last'; it is damaged or not ibcore's"
        )
    labels = payload.get("labels")
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    try:
        meta = _read_json(path / "meta.json")
    except (OSError, ValueError):
        meta = {}
    return RunDirectory(path, rows, labels, meta if isinstance(meta, dict) else {}, _dataset_name(path))


# -- comparability ----------------------------------------------------------------------------------------


def _class_counts(meta: Mapping[str, Any]) -> list[int] | None:
    counts = meta.get("class_counts")
    if isinstance(counts, list) and counts and all(isinstance(c, int) for c in counts):
        return counts
    return None


def _describe_counts(counts: list[int]) -> str:
    return f"{len(counts)} classes, {sum(counts)} images, {max(counts)} to {min(counts)} per class"


def _test_split(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The test split's size and label checksum, as the first seed's data fingerprint recorded them."""
    fingerprints = meta.get("data_fingerprint")
    if not isinstance(fingerprints, dict) or not fingerprints:
        return None
    test = next(iter(fingerprints.values()), None)
    test = test.get("test") if isinstance(test, dict) else None
    if not isinstance(test, dict) or "labels_sha256" not in test:
        return None
    return {"images": test.get("images"), "labels_sha256": test.get("labels_sha256")}


def _describe_test(test: Mapping[str, Any]) -> str:
    return f"{test['images']} images, labels {str(test['labels_sha256'])[:8]}"


def _difference(
    what: str,
    dirs: Sequence[RunDirectory],
    names: Sequence[str],
    value_of: Callable[[RunDirectory], Any],
    describe: Callable[[Any], str],
) -> str | None:
    """``"dataset: mnist_lt (a, b) vs array_file (c)"`` when the known values of ``value_of`` are not all equal."""
    groups: dict[str, tuple[Any, list[str]]] = {}  # the directories of each distinct value, in order
    for name, run_dir in zip(names, dirs, strict=True):
        value = value_of(run_dir)
        if value is not None:
            groups.setdefault(json.dumps(value, sort_keys=True), (value, []))[1].append(name)
    if len(groups) < 2:
        return None
    described = [(describe(value), members) for value, members in groups.values()]
    if len({text for text, _ in described}) < len(described):  # the same summary of different values: say so
        described = [(f"{text}, variant {number}", members) for number, (text, members) in enumerate(described, 1)]
    return f"{what}: " + " vs ".join(f"{text} ({', '.join(members)})" for text, members in described)


def comparability_warnings(dirs: Sequence[RunDirectory], names: Sequence[str]) -> list[str]:
    """What makes the numbers of these run directories not comparable: a different data set, training class
    counts or test split (one warning, a line for each), and smoke runs (whose numbers mean nothing)."""
    differences = [
        _difference("dataset", dirs, names, lambda d: d.dataset, str),
        _difference("training class counts", dirs, names, lambda d: _class_counts(d.meta), _describe_counts),
        _difference("test split", dirs, names, lambda d: _test_split(d.meta), _describe_test),
    ]
    found = [difference for difference in differences if difference is not None]
    warnings = []
    if found:
        which = ", ".join(difference.split(":", 1)[0] for difference in found)
        lines = [f"the experiments differ in {which}: their numbers are not comparable"]
        warnings.append("\n  ".join(lines + found))
    for name, run_dir in zip(names, dirs, strict=True):
        if run_dir.meta.get("smoke"):
            warnings.append(f"{name} is a smoke run (ib run --smoke): its numbers mean nothing")
    unchecked = [name for name, run_dir in zip(names, dirs, strict=True) if not run_dir.meta]
    if unchecked and len(dirs) > 1:
        warnings.append(
            f"no readable meta.json in {', '.join(unchecked)}: its data could not be checked against the others'"
        )
    return warnings


# -- the tables -------------------------------------------------------------------------------------------


def source_names(paths: Sequence[Path]) -> list[str]:
    """The name of each run directory, with as many of its parent folders as it takes to tell them apart."""
    parts = [path.parts or (str(path),) for path in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(path) for path in paths]


def _merged_labels(dirs: Sequence[RunDirectory]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for run_dir in dirs:
        labels.update({key: label for key, label in run_dir.labels.items() if key not in labels})
    return labels


def report_table(run_dir: str | Path) -> SummaryTable:
    """The last-epoch table of one run directory, as ``ib report`` shows it."""
    read = read_run_dir(run_dir)
    return SummaryTable(summarise(read.rows), read.labels, warnings=comparability_warnings([read], [read.name]))


def compare_run_dirs(run_dirs: Sequence[str | Path]) -> SummaryTable:
    """The last-epoch tables of several run directories as one: every method of each, with its experiment.

    Every directory is checked before any is read, and all problems are raised together. ``warnings`` says
    when the experiments differ in data set, class counts or test split.
    """
    if not run_dirs:
        raise IbError("name at least one run directory")
    paths = [Path(path).expanduser() for path in run_dirs]
    problems = [f"{path}: {problem}" for path in paths if (problem := _problem(path)) is not None]
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.exists() and path.resolve() in seen:
            first = seen[path.resolve()]
            problems.append(f"{path}: given twice" + ("" if first == path else f" (also as {first})"))
        elif path.exists():
            seen[path.resolve()] = path
    if problems:
        raise NotARunDirectory("\n".join(problems))
    dirs = [read_run_dir(path) for path in paths]
    names = source_names(paths)
    summaries, experiments = [], []
    for name, run_dir in zip(names, dirs, strict=True):
        for summary in summarise(run_dir.rows):
            summaries.append(summary)
            experiments.append(name)
    title = f"results (last epoch) of {len(dirs)} experiment{'s' if len(dirs) != 1 else ''}"
    return SummaryTable(summaries, _merged_labels(dirs), experiments, title, comparability_warnings(dirs, names))
