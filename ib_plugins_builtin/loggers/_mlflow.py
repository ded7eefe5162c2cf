"""The mlflow logger: one MLflow run per run, in a local file store unless a tracking URI is given."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ibcore.protocols import LogSession

_MAX_VALUE = 500  # MLflow's limit on a param value's length


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys (``runs.0.loss.name``), each value as text."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = {}
        for index, item in enumerate(value):
            name = item.get("name") if isinstance(item, Mapping) else None
            out.update(flatten(item, f"{prefix}{name if isinstance(name, str) else index}."))
        return out
    return {prefix.rstrip("."): str(value)[:_MAX_VALUE]}


class MlflowLogger:
    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client: MlflowClient | None = None
        self.run_ids: dict[str, str] = {}

    def start(self, session: LogSession) -> Mapping[str, Any]:
        uri = session.state.get("tracking_uri") or self.tracking_uri
        if uri is None:
            uri = (session.run_dir.parent / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store working but refuses it unless asked: a local store needs no server and no
            # database, which is what a researcher's laptop has. A sqlite:// or http:// URI is used as given.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
        saved = session.state.get("runs", {})
        params = [Param(k, v) for k, v in flatten(session.config).items() if k]
        for run in session.runs:
            name = str(run["name"])
            run_id = saved.get(name) if isinstance(saved, Mapping) else None
            if run_id:
                client.update_run(run_id, status="RUNNING")  # `ib resume`: the same MLflow run goes on
            else:
                tags = {
                    "ibcore.method": str(run["method"]),
                    "ibcore.seed": str(run["seed"]),
                    "ibcore.config_hash": session.config_hash,
                    "ibcore.run_dir": str(session.run_dir),
                    "ibcore.experiment": session.experiment,
                }
                run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
                for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    client.log_batch(run_id, params=params[start : start + 100])
            self.run_ids[name] = run_id
        return {"tracking_uri": uri, "experiment": self.experiment, "runs": dict(self.run_ids)}

    def log(self, run: str, epoch: int, metrics: Mapping[str, float]) -> None:
        assert self.client is not None
        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, epoch) for key, value in metrics.items()]
        self.client.log_batch(self.run_ids[run], metrics=batch)

    def finish(self, rows: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
        assert self.client is not None
        for row in rows:
            run_id = self.run_ids.get(str(row["run"]))
            if run_id is None:
                continue
            status = str(row.get("status", "ok"))
            self.client.log_batch(run_id, tags=[RunTag("ibcore.status", status[:_MAX_VALUE])])
            for path in files:
                self.client.log_artifact(run_id, str(path))
            self.client.set_terminated(run_id, "FINISHED" if status == "ok" else "FAILED")
