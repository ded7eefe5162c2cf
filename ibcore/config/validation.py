"""Two-level validation of an experiment: the schema first, then every component against the registry.

Every problem is collected (never just the first) with its path, so ``ib validate`` can print them all.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ibcore.config.errors import issues_from_validation_error
from ibcore.config.grid import expand_grids, rename_paths
from ibcore.config.loading import compose_config_file, compose_mapping
from ibcore.config.overrides import apply_overrides
from ibcore.config.schema import Experiment, RunConfig, TrainerConfig, _default_evaluators
from ibcore.config.walk import component_specs
from ibcore.errors import ConfigError, ConfigIssue, RegistryError
from ibcore.registry import describe_plugin_exception, resolve

_RUN_COMPONENTS = ("backbone", "loss", "optimizer", "sampler", "mixer", "step", "augmentation")
_REQUIRED = ("backbone", "loss", "optimizer")


@contextmanager
def _import_path(directories: Sequence[Path]) -> Iterator[None]:
    """Put ``directories`` first on ``sys.path`` for the duration of the imports only."""
    added = [str(d) for d in directories if str(d) not in sys.path]
    sys.path[0:0] = added
    try:
        yield
    finally:
        for directory in added:
            if directory in sys.path:
                sys.path.remove(directory)


def plugin_search_dirs(config_dirs: Sequence[Path] | Path | None = None) -> list[Path]:
    """Where ``plugins:`` modules are looked for: the config's folder(s), then the working directory
    (as ``python -m`` would), then the installed packages."""
    if isinstance(config_dirs, Path):
        config_dirs = [config_dirs]
    found: list[Path] = []
    for directory in [*(config_dirs or []), Path.cwd()]:
        directory = directory.resolve()
        if directory not in found:
            found.append(directory)
    return found


def _where_searched(directories: Sequence[Path], config_dirs: int) -> str:
    cwd = Path.cwd().resolve()
    parts = []
    for i, directory in enumerate(directories):
        if i < config_dirs:
            what = "the config's folder" + (" (the working directory)" if directory == cwd else "")
        else:
            what = "the working directory"
        parts.append(f"{what} {directory}")
    return ", ".join(parts) + " or the installed packages"


def import_plugins(
    modules: Any, config_dirs: Sequence[Path] | Path | None = None, *, label: str = "plugins"
) -> list[ConfigIssue]:
    """Import every module of the ``plugins:`` list (trusted code); return the ones that failed.

    Modules are looked for in ``config_dirs`` (the folders of the config file and of the files it
    extends), then the working directory, then the installed packages; ``sys.path`` is changed only
    while they are imported. Issues are at ``{label}[i]``.
    """
    if not isinstance(modules, list):
        return []  # the schema reports the type error
    if isinstance(config_dirs, Path):
        config_dirs = [config_dirs]
    config_dirs = list(config_dirs or [])
    directories = plugin_search_dirs(config_dirs)
    searched_config_dirs = len({d.resolve() for d in config_dirs})
    issues = []
    importlib.invalidate_caches()  # a module written a moment ago (a notebook, a test) is found
    with _import_path(directories):
        for i, module in enumerate(modules):
            if not isinstance(module, str):
                continue
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                missing = exc.name or ""
                if missing and (module == missing or module.startswith(missing + ".")):
                    message = (
                        f"could not import {module!r}: no module named {missing!r} in "
                        f"{_where_searched(directories, searched_config_dirs)}"
                    )
                else:  # the module was found; something it imports is missing
                    message = f"could not import {module!r}: ModuleNotFoundError: {exc}"
                issues.append(ConfigIssue(f"{label}[{i}]", message))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # any error in user code is reported, not raised: sys.exit() too
                what = describe_plugin_exception(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
                message = f"could not import {module!r}: {what}"
                issues.append(ConfigIssue(f"{label}[{i}]", message))
    return issues


def import_config_plugins(path: str | Path) -> None:
    """Import the ``plugins:`` of the config file at ``path`` (and of the files it extends), nothing else;
    raise :class:`ConfigError` if the file cannot be read or a module cannot be imported."""
    composed = compose_config_file(path)
    modules = composed.data.get("plugins", [])
    if not isinstance(modules, list):
        raise ConfigError([ConfigIssue("plugins", "expected a list of module names")], source=str(path))
    issues = import_plugins(modules, _folders(composed.files))
    if issues:
        raise ConfigError(issues, source=str(path))


def _folders(files: Sequence[Path]) -> list[Path]:
    folders: list[Path] = []
    for file in files:
        folder = file.resolve().parent
        if folder not in folders:
            folders.append(folder)
    return folders


def _registry_message(exc: RegistryError) -> str:
    """A registry error as one readable message for a config issue (first lines only)."""
    lines = str(exc).splitlines()
    return " ".join(line.strip() for line in lines[:2])


def _check_component(
    spec: Any, kind: str, path: str, context: dict[str, Any] | None = None
) -> tuple[list[ConfigIssue], BaseModel | None]:
    """Check one raw ``{name, params}`` mapping against the registry and the component's params model.

    ``context`` is pydantic's validation context (``num_classes`` when the dataset tells it). Returns the
    issues and, when there are none, the validated params.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        return [], None  # the schema reports the shape problem
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        return [], None
    try:
        info = resolve(kind, spec["name"])
    except RegistryError as exc:
        return [ConfigIssue(f"{path}.name", _registry_message(exc))], None
    assert info.params is not None
    try:
        validated = info.params.model_validate(dict(params), context=context)
    except ValidationError as exc:
        return issues_from_validation_error(exc, prefix=f"{path}.params", model=info.params, root=dict(params)), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a validator of a plugin's params model that fails instead of refusing
        message = (
            f"the params model of {kind} {spec['name']!r} ({info.provider_label}) failed while checking them: "
            f"{describe_plugin_exception(exc)}"
        )
        return [ConfigIssue(f"{path}.params", message)], None
    return [], validated


def num_classes_hint(params: BaseModel | None) -> int | None:
    """The class count a dataset's validated params tell without loading data (their optional
    ``num_classes_hint()`` method), else None."""
    hint = getattr(params, "num_classes_hint", None)
    if not callable(hint):
        return None
    try:
        value = hint()
    except KeyboardInterrupt:
        raise
    except BaseException:  # a plugin's hint must never break validation (not even with sys.exit): only a hint
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _items(value: Any) -> list[tuple[int, Any]]:
    return list(enumerate(value)) if isinstance(value, list) else []


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _raw_specs(data: Mapping[str, Any]) -> Iterator[tuple[Any, str, str]]:
    """Every ``{name, params}`` mapping of a raw config with its kind and path (even if the rest is broken)."""
    if not isinstance(data, Mapping):
        return
    yield from component_specs(Experiment, data)
    if "evaluators" not in data:
        for evaluator in _default_evaluators():  # checked too, so `ib run` cannot fail on them later
            yield evaluator.model_dump(), "evaluator", "evaluators (default)"


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


_SMOKE_ADVICE = (
    "To try every stage quickly, keep trainer.epochs and run `ib run` with --smoke (a few batches of the first "
    "epoch of each stage)"
)


def _stage_after_the_end(start: int, epochs: int) -> str:
    """Why a stage's ``from_epoch`` (>= 1 by the schema) cannot start within ``epochs`` epochs, and what to do.

    Epochs count completed epochs: ``from_epoch: N`` starts the stage after N epochs, so it needs N < epochs."""
    if epochs == 1:
        return (
            f"{start} is never reached: a stage starts after at least 1 epoch and trainer.epochs=1 trains only one, "
            f"so no stage can run. {_SMOKE_ADVICE}; otherwise remove the stage"
        )
    return (
        f"{start} is not before trainer.epochs={epochs}: a stage starts after 1 to {epochs - 1} completed epochs "
        f"(from_epoch: N starts it after N epochs). {_SMOKE_ADVICE}; otherwise move the stage (from_epoch below "
        f"{epochs}) or train longer"
    )


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
                issues.append(ConfigIssue(f"runs[{i}].stages[{j}].from_epoch", _stage_after_the_end(start, epochs)))
            if previous is not None and start <= previous:
                issues.append(
                    ConfigIssue(f"runs[{i}].stages[{j}].from_epoch", "stages must be in increasing from_epoch order")
                )
            previous = start
            if isinstance(stage, Mapping) and not set(stage) - {"from_epoch"}:
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].stages[{j}]",
                        "the stage changes nothing; set loss, sampler, mixer, optimizer, step, retrain_classifier, "
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


def _load_mapping(source: Any) -> tuple[dict[str, Any], str | None, list[Path]]:
    """The composed mapping, its name for messages, and the folders of the files it was composed from."""
    if isinstance(source, (str, Path)):
        composed = compose_config_file(source)
        return composed.data, str(source), _folders(composed.files)
    if isinstance(source, Mapping):
        composed = compose_mapping(dict(source))
        return composed.data, None, _folders(composed.files)
    raise ConfigError([ConfigIssue("", f"expected a path or a mapping, got {type(source).__name__}")])


def _component_issues(data: Mapping[str, Any]) -> list[ConfigIssue]:
    """Every component against the registry; with the dataset's class count when it can tell it, so
    per-class lists (``ibcore.PerClass``) are checked too."""
    specs = list(_raw_specs(data))
    issues: list[ConfigIssue] = []
    context: dict[str, Any] | None = None
    for spec, kind, path in specs:
        if kind == "dataset":
            found, params = _check_component(spec, kind, path)
            issues += found
            classes = num_classes_hint(params)
            if classes is not None:
                context = {"num_classes": classes, "dataset": spec["name"]}
    for spec, kind, path in specs:
        if kind != "dataset":
            issues += _check_component(spec, kind, path, context)[0]
    return issues


def load_experiment_with_plugin_dirs(
    source: Any, *, overrides: list[str] | None = None, plugin_dirs: Sequence[Path] | None = None
) -> tuple[Experiment, list[Path]]:
    """:func:`load_experiment`, and the folders its ``plugins:`` were looked for in before the working
    directory (the engine records them, so ``ib resume`` finds the same modules)."""
    if isinstance(source, Experiment):
        source = source.model_dump(exclude_unset=False)
    data, name, folders = _load_mapping(source)
    if plugin_dirs is not None:
        folders = list(plugin_dirs)
    issues: list[ConfigIssue] = []
    if overrides:
        data, override_issues = apply_overrides(data, overrides)
        issues += override_issues
        if "extends" in data:
            message = "is resolved when the file is read; --set cannot change it: write extends in the file"
            issues.append(ConfigIssue("extends", message))
    data, grid_issues, origins = expand_grids(data)
    issues += grid_issues
    issues += import_plugins(data.get("plugins", []), folders)
    issues += rename_paths(_component_issues(data) + _cross_field_issues(data), origins)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        issues += rename_paths(issues_from_validation_error(exc, model=Experiment, root=data), origins)
        raise ConfigError(issues, source=name) from None
    experiment = _merge_defaults(experiment)
    if issues:
        raise ConfigError(issues, source=name)
    return experiment, folders


def load_experiment(
    source: Any, *, overrides: list[str] | None = None, plugin_dirs: Sequence[Path] | None = None
) -> Experiment:
    """Load, merge defaults into runs and fully validate an experiment; raise ConfigError with every issue.

    ``source`` is a YAML path (its ``extends`` resolved), a mapping or an :class:`Experiment`.
    ``overrides`` are ``PATH=VALUE`` strings as given to ``ib run --set``, applied to the composed
    mapping. ``plugin_dirs`` replaces the folders searched for ``plugins:`` before the working
    directory (default: the folders of the config file and of the files it extends).
    """
    return load_experiment_with_plugin_dirs(source, overrides=overrides, plugin_dirs=plugin_dirs)[0]


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


__all__ = [
    "RunConfig",
    "import_config_plugins",
    "import_plugins",
    "load_experiment",
    "load_experiment_with_plugin_dirs",
    "num_classes_hint",
    "plugin_search_dirs",
    "select_runs",
    "validate",
]
