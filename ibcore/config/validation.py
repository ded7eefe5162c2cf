"""Two-level validation of an experiment: the schema first, then every component against the registry.

Every problem is collected (never just the first) with its path, so ``ib validate`` can print them all.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ibcore.config.errors import issues_from_validation_error
from ibcore.config.loading import read_config_file
from ibcore.config.overrides import apply_overrides
from ibcore.config.schema import Experiment, RunConfig, TrainerConfig, _default_evaluators
from ibcore.errors import ConfigError, ConfigIssue, RegistryError
from ibcore.registry import resolve

_RUN_COMPONENTS = ("backbone", "loss", "optimizer", "sampler", "mixer")
_REQUIRED = ("backbone", "loss", "optimizer")


@contextmanager
def _import_path(directory: Path | None) -> Iterator[None]:
    """Let ``plugins:`` name modules that sit next to the config file."""
    added = directory is not None and str(directory) not in sys.path
    if added:
        sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(directory))


def import_plugins(modules: Any, base_dir: Path | None = None) -> list[ConfigIssue]:
    """Import every module of the ``plugins:`` list (trusted code); return the ones that failed."""
    if not isinstance(modules, list):
        return []  # the schema reports the type error
    issues = []
    with _import_path(base_dir):
        for i, module in enumerate(modules):
            if not isinstance(module, str):
                continue
            try:
                importlib.import_module(module)
            except Exception as exc:  # any error in user code is reported, not raised
                issues.append(ConfigIssue(f"plugins[{i}]", f"could not import {module!r}: {type(exc).__name__}: {exc}"))
    return issues


def _registry_message(exc: RegistryError) -> str:
    """A registry error as one readable message for a config issue (first lines only)."""
    lines = str(exc).splitlines()
    return " ".join(line.strip() for line in lines[:2])


def _check_component(spec: Any, kind: str, path: str) -> list[ConfigIssue]:
    """Check one raw ``{name, params}`` mapping against the registry and the component's params model."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        return []  # the schema reports the shape problem
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        return []
    try:
        info = resolve(kind, spec["name"])
    except RegistryError as exc:
        return [ConfigIssue(f"{path}.name", _registry_message(exc))]
    assert info.params is not None
    try:
        info.params.model_validate(dict(params))
    except ValidationError as exc:
        return issues_from_validation_error(exc, prefix=f"{path}.params", model=info.params, root=dict(params))
    return []


def _items(value: Any) -> list[tuple[int, Any]]:
    return list(enumerate(value)) if isinstance(value, list) else []


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _raw_specs(data: Mapping[str, Any]) -> Iterator[tuple[Any, str, str]]:
    """Every ``{name, params}`` mapping of a raw config with its kind and path (even if the rest is broken)."""
    yield _get(_get(data, "data"), "dataset"), "dataset", "data.dataset"
    for field in _RUN_COMPONENTS:
        yield _get(_get(data, "defaults"), field), field, f"defaults.{field}"
    for i, run in _items(_get(data, "runs")):
        for field in _RUN_COMPONENTS:
            yield _get(run, field), field, f"runs[{i}].{field}"
        for j, stage in _items(_get(run, "stages")):
            for field in ("loss", "sampler", "mixer", "optimizer"):
                yield _get(stage, field), field, f"runs[{i}].stages[{j}].{field}"
        for j, adjustment in _items(_get(run, "posthoc")):
            yield adjustment, "adjustment", f"runs[{i}].posthoc[{j}]"
    if isinstance(data, Mapping) and "evaluators" not in data:
        for evaluator in _default_evaluators():  # checked too, so `ib run` cannot fail on them later
            yield evaluator.model_dump(), "evaluator", "evaluators (default)"
    for i, evaluator in _items(_get(data, "evaluators")):
        yield evaluator, "evaluator", f"evaluators[{i}]"


def _merge_defaults(experiment: Experiment) -> Experiment:
    runs = []
    for run in experiment.runs:
        updates = {}
        for field in _RUN_COMPONENTS:
            if getattr(run, field) is None and getattr(experiment.defaults, field) is not None:
                updates[field] = getattr(experiment.defaults, field)
        runs.append(run.model_copy(update=updates))
    return experiment.model_copy(update={"runs": runs})


_CLASSIFIER_CONFLICT = {
    "scale_classifier": "a run re-trains its classifier one way: retrain_classifier (cRT, a new classifier) "
    "or scale_classifier (LWS, the trained classifier with a learned scale per class), not both",
    "train_classifier": "retrain_classifier trains a new classifier, train_classifier the trained one: choose one",
}


def _cross_field_issues(data: Mapping[str, Any]) -> list[ConfigIssue]:
    """Mistakes that involve several fields, checked on the raw mapping so that a schema error
    elsewhere does not hide them."""
    issues = []
    epochs = _get(data, "trainer") and _get(data["trainer"], "epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        epochs = TrainerConfig.model_fields["epochs"].default
    defaults = _get(data, "defaults")
    seen: dict[str, int] = {}
    for i, run in _items(_get(data, "runs")):
        if not isinstance(run, Mapping):
            continue
        name = run.get("name")
        if isinstance(name, str):
            if name in seen:
                message = f"duplicate run name {name!r} (also runs[{seen[name]}])"
                issues.append(ConfigIssue(f"runs[{i}].name", message))
            seen.setdefault(name, i)
        for field in _REQUIRED:
            if run.get(field) is None and _get(defaults, field) is None:
                issues.append(ConfigIssue(f"runs[{i}].{field}", f"required: set it here or under defaults.{field}"))
        previous = None
        classifier_stages: set[str] = set()
        for j, stage in _items(run.get("stages")):
            start = _get(stage, "from_epoch")
            if not isinstance(start, int) or isinstance(start, bool):
                continue
            if start >= epochs:
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].stages[{j}].from_epoch",
                        f"{start} is outside the training epochs 0..{epochs - 1} (trainer.epochs={epochs})",
                    )
                )
            if previous is not None and start <= previous:
                issues.append(
                    ConfigIssue(f"runs[{i}].stages[{j}].from_epoch", "stages must be in increasing from_epoch order")
                )
            previous = start
            if isinstance(stage, Mapping) and not set(stage) - {"from_epoch"}:
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].stages[{j}]",
                        "the stage changes nothing; set loss, sampler, mixer, optimizer, retrain_classifier, "
                        "scale_classifier or train_classifier",
                    )
                )
            for flag in ("retrain_classifier", "scale_classifier", "train_classifier"):
                if _get(stage, flag) is True and flag not in classifier_stages:
                    conflicted = "retrain_classifier" in classifier_stages and len(classifier_stages) > 1
                    classifier_stages.add(flag)
                    conflicts = "retrain_classifier" in classifier_stages and len(classifier_stages) > 1
                    if conflicts and not conflicted:  # said once, where the second way first appears
                        other = "scale_classifier" if "scale_classifier" in classifier_stages else "train_classifier"
                        issues.append(ConfigIssue(f"runs[{i}].stages[{j}].{flag}", _CLASSIFIER_CONFLICT[other]))
            if _get(stage, "batchnorm") is not None and not classifier_stages:
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].stages[{j}].batchnorm",
                        "applies only while the backbone is frozen: set retrain_classifier, scale_classifier or "
                        "train_classifier in this stage or an earlier one",
                    )
                )
        adjustments = [_get(a, "name") for _, a in _items(run.get("posthoc"))]
        for j, adjustment in enumerate(adjustments):
            if isinstance(adjustment, str) and adjustment in adjustments[:j]:
                message = f"post-hoc adjustment {adjustment!r} is listed twice (each is reported as its own row)"
                issues.append(ConfigIssue(f"runs[{i}].posthoc[{j}].name", message))
    names = [_get(e, "name") for _, e in _items(_get(data, "evaluators"))]
    for i, name in enumerate(names):
        if isinstance(name, str) and name in names[:i]:
            issues.append(ConfigIssue(f"evaluators[{i}].name", f"evaluator {name!r} is listed twice"))
    return issues


def _load_mapping(source: Any) -> tuple[dict[str, Any], str | None, Path | None]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return read_config_file(path), str(path), path.resolve().parent
    if isinstance(source, Mapping):
        return dict(source), None, None
    raise ConfigError([ConfigIssue("", f"expected a path or a mapping, got {type(source).__name__}")])


def load_experiment(source: Any, *, overrides: list[str] | None = None) -> Experiment:
    """Load, merge defaults into runs and fully validate an experiment; raise ConfigError with every issue.

    ``source`` is a YAML path, a mapping or an :class:`Experiment`. ``overrides`` are ``PATH=VALUE``
    strings as given to ``ib run --set``.
    """
    if isinstance(source, Experiment):
        source = source.model_dump(exclude_unset=False)
    data, name, base_dir = _load_mapping(source)
    issues: list[ConfigIssue] = []
    if overrides:
        data, override_issues = apply_overrides(data, overrides)
        issues += override_issues
    issues += import_plugins(data.get("plugins", []), base_dir)
    for spec, kind, path in _raw_specs(data):
        issues += _check_component(spec, kind, path)
    issues += _cross_field_issues(data)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        issues += issues_from_validation_error(exc, model=Experiment, root=data)
        raise ConfigError(issues, source=name) from None
    experiment = _merge_defaults(experiment)
    if issues:
        raise ConfigError(issues, source=name)
    return experiment


def select_runs(experiment: Experiment, names: list[str], source: str | None = None) -> Experiment:
    """The experiment with only the runs named in ``names`` (``ib run --only``), in the config's order."""
    known = [run.name for run in experiment.runs]
    unknown = [name for name in names if name not in known]
    if unknown:
        issues = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            issues.append(ConfigIssue("--only", f"no run is called {name!r}{hint} The runs: {', '.join(known)}"))
        raise ConfigError(issues, source=source)
    return experiment.model_copy(update={"runs": [run for run in experiment.runs if run.name in names]})


def validate(source: Any, *, overrides: list[str] | None = None) -> list[ConfigIssue]:
    """Every issue in an experiment config; an empty list when it is valid."""
    try:
        load_experiment(source, overrides=overrides)
    except ConfigError as exc:
        return exc.issues
    return []


__all__ = ["RunConfig", "import_plugins", "load_experiment", "select_runs", "validate"]
