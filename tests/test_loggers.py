"""Experiment trackers (``loggers:``): each run is a run in the tracker, with the values of metrics.jsonl; a
failing tracker is switched off without touching training; a resume continues the same tracker runs. The
trackers' own packages read their files back (installed in CI with the ``loggers`` extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_engine import tiny_config

import ibcore
from ibcore.engine import resume
from ibcore.errors import ConfigError


def metrics_of(run_dir: Path) -> dict[tuple[str, int, str], float]:
    """(run, epoch, tracker key) -> value, from metrics.jsonl, named as the loggers name them."""
    from ibcore.engine.tracking import scalars

    values = {}
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        line = json.loads(text)
        for key, value in scalars(line).items():
            values[(line["run"], line["epoch"], key)] = value
    return values


def trained(tmp_path: Path, loggers: list[dict[str, Any]], epochs: int = 2) -> Any:
    config = tiny_config(epochs=epochs)
    config["runs"][0]["posthoc"] = [{"name": "tau_norm"}]
    config["loggers"] = loggers
    return ibcore.run(config, out_dir=tmp_path / "runs", quiet=True)


def test_tensorboard_event_files_hold_the_values_of_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = trained(tmp_path, [{"name": "tensorboard"}])
    expected = metrics_of(results.run_dir)
    for run in ("ce", "focal", "ce+tau_norm"):
        events = EventAccumulator(str(results.run_dir / "tensorboard" / run))
        events.Reload()
        logged = {(run, e.step, key): e.value for key in events.Tags()["scalars"] for e in events.Scalars(key)}
        mine = {k: v for k, v in expected.items() if k[0] == run}
        assert mine and {k: logged[k] for k in mine} == pytest.approx(mine, rel=1e-6)
    assert "test/acc1" in events.Tags()["scalars"]


def test_mlflow_runs_hold_the_config_the_metrics_and_the_results(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    results = trained(tmp_path, [{"name": "mlflow", "params": {"experiment": "lt"}}])
    assert "failed" not in (results.run_dir / "train.log").read_text()
    state = json.loads((results.run_dir / "loggers.json").read_text())["loggers[0] (mlflow)"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    expected = metrics_of(results.run_dir)
    assert set(state["runs"]) == {"ce", "focal", "ce+tau_norm"}
    for run, run_id in state["runs"].items():
        tracked = client.get_run(run_id)
        assert tracked.info.status == "FINISHED" and tracked.data.tags["ibcore.method"] == run
        assert tracked.data.params["trainer.epochs"] == "2"
        for (name, epoch, key), value in expected.items():
            if name == run:
                history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
                assert history[epoch] == pytest.approx(value, rel=1e-9), (run, key)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"results.md", "results.json", "config.yaml"} <= artifacts


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``): W&B's LevelDB-style log of 32 KiB
    blocks, each record behind a 7-byte header (crc32, length, type: full, first, middle, last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    position, block, records, pending = 7, 32768, [], b""  # after the file header (":W&B", magic, version)
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return records


def test_wandb_offline_runs_stay_on_the_machine_with_the_values_of_metrics_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    results = trained(tmp_path, [{"name": "wandb"}])
    state = json.loads((results.run_dir / "loggers.json").read_text())["loggers[0] (wandb)"]
    assert state["mode"] == "offline" and "failed" not in (results.run_dir / "train.log").read_text()
    expected = metrics_of(results.run_dir)
    final = {row["run"]: row for row in results.rows}
    for run, run_id in state["runs"].items():
        (directory,) = (results.run_dir / "wandb").glob(f"offline-run-*-{run_id}")
        records = wandb_records(directory / f"run-{run_id}.wandb")
        logged = {}
        for record in records:
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                logged.update({(run, items["epoch"], k): v for k, v in items.items() if "/" in k})
        mine = {k: v for k, v in expected.items() if k[0] == run}
        assert mine and {k: logged[k] for k in mine} == pytest.approx(mine, rel=1e-6)
        summary = {
            item.key: json.loads(item.value_json)
            for record in records
            if record.WhichOneof("record_type") == "summary"
            for item in record.summary.update
        }
        assert summary["final/acc1"] == pytest.approx(final[run]["acc1"])
        assert (directory / "files" / "results.md").is_file()


class _Broken:
    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in
        self.lines = 0

    def start(self, session: Any) -> None:
        if self.fail_in == "start":
            raise ConnectionError("tracking server down")

    def log(self, run: str, epoch: int, metrics: Any) -> None:
        self.lines += 1
        if self.fail_in == "log":
            raise OSError(28, "No space left on device")

    def finish(self, rows: Any, files: Any) -> None:
        pass


class _Recorder(_Broken):
    def __init__(self) -> None:
        super().__init__("never")
        self.logged: list[tuple[str, int, dict[str, float]]] = []
        self.finished = False

    def log(self, run: str, epoch: int, metrics: Any) -> None:
        self.logged.append((run, epoch, dict(metrics)))

    def finish(self, rows: Any, files: Any) -> None:
        self.finished = True


@pytest.mark.parametrize("fail_in", ["start", "log"])
def test_a_failing_logger_is_reported_once_and_training_goes_on(tmp_path: Path, fail_in: str) -> None:
    broken, recorder = _Broken(fail_in), _Recorder()
    with ibcore.registry_snapshot():
        ibcore.register_logger("ibtest_broken")(lambda params, context: broken)
        ibcore.register_logger("ibtest_recorder")(lambda params, context: recorder)
        results = trained(tmp_path, [{"name": "ibtest_broken"}, {"name": "ibtest_recorder"}])
        plain = ibcore.run(tiny_config(epochs=2), out_dir=tmp_path / "plain", quiet=True)
    log = (results.run_dir / "train.log").read_text()
    assert log.count("loggers[0] (ibtest_broken) failed") == 1 and "switched off" in log
    assert broken.lines <= 1  # switched off after its first failure
    assert recorder.finished and len(recorder.logged) == len(metrics_of_lines(results.run_dir))
    for row in results.rows:  # the training is the one without loggers
        if row["run"] in ("ce", "focal"):
            assert row["acc1"] == plain.row(row["run"])["acc1"]


def metrics_of_lines(run_dir: Path) -> list[dict[str, Any]]:
    from ibcore.engine.tracking import scalars

    lines = [json.loads(t) for t in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if scalars(line)]


def test_a_missing_tracker_package_names_its_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    config = tiny_config(epochs=1)
    config["loggers"] = [{"name": "mlflow"}]
    with pytest.raises(ConfigError) as caught:
        ibcore.run(config, out_dir=tmp_path, quiet=True)
    (issue,) = caught.value.issues
    assert issue.path == "loggers[0]" and "pip install 'ibcore[mlflow]'" in issue.message


def test_a_resume_continues_the_same_mlflow_runs(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    config = tiny_config(epochs=2)
    config["loggers"] = [{"name": "mlflow"}]
    results = ibcore.run(config, out_dir=tmp_path / "runs", quiet=True)
    before = json.loads((results.run_dir / "loggers.json").read_text())
    (results.run_dir / "checkpoints" / "epoch-0002.pt").unlink()  # as if stopped after the first epoch
    resumed = resume(results.run_dir, quiet=True)
    after = json.loads((results.run_dir / "loggers.json").read_text())
    assert after == before
    state = after["loggers[0] (mlflow)"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("ibcore").experiment_id])) == 2
    for run_id in state["runs"].values():
        steps = [m.step for m in client.get_metric_history(run_id, "test/acc1")]
        assert set(steps) == {1, 2}
        assert client.get_run(run_id).info.status == "FINISHED"
    assert resumed.row("ce")["acc1"] == results.row("ce")["acc1"]
