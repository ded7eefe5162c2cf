"""Data paths resolved once, when a run starts.

A dataset marks its path params with :data:`ibcore.DataPath`; ``ib run`` writes them absolute into the
run's config.yaml, so ``ib resume`` started from another folder reads the data the run started with
instead of whatever sits at the same relative path there.
"""

from __future__ import annotations

from pathlib import Path

from ibcore.config.schema import Experiment
from ibcore.registry import DataPath, resolve


def resolve_data_paths(experiment: Experiment, cwd: Path | None = None) -> Experiment:
    """``experiment`` with every relative :data:`DataPath` param of its dataset made absolute (from ``cwd``)."""
    spec = experiment.data.dataset
    params_model = resolve("dataset", spec.name).params
    if params_model is None:
        return experiment
    base = cwd or Path.cwd()
    params = dict(spec.params)
    for name, field in params_model.model_fields.items():
        value = params.get(name)
        if any(marker is DataPath for marker in field.metadata) and isinstance(value, str):
            path = Path(value).expanduser()
            params[name] = str(path if path.is_absolute() else (base / path).resolve())
    if params == spec.params:
        return experiment
    data = experiment.data.model_copy(update={"dataset": spec.model_copy(update={"params": params})})
    return experiment.model_copy(update={"data": data})
