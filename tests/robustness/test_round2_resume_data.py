"""`ib resume` reads the data the run started with: dataset paths are stored absolute at `ib run`, and a data set
that changed since (other files at the same path) is refused with what differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from _support import no_traceback


def write_arrays(path: Path, seed: int, per_class: tuple[int, ...] = (12, 6, 3)) -> None:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (len(labels), 8, 8, 1), dtype=np.uint8),
        train_labels=labels,
        test_images=rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8),
        test_labels=np.arange(6) % len(per_class),
    )


def experiment(tmp_path: Path) -> Path:
    config = {
        "data": {"dataset": {"name": "array_file", "params": {"path": "data.npz", "pad": 0}}, "batch_size": 8},
        "trainer": {"epochs": 1, "device": "cpu", "out_dir": str(tmp_path / "runs")},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"width": 4}},
            "optimizer": {"name": "sgd"},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [{"name": "ce"}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
def finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ib_cli: Any) -> Path:
    started_in = tmp_path / "a"
    started_in.mkdir()
    write_arrays(started_in / "data.npz", seed=0)
    monkeypatch.chdir(started_in)
    assert ib_cli("run", str(experiment(tmp_path)), "--quiet").rc == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def test_the_run_directory_stores_the_data_path_resolved(finished_run: Path, tmp_path: Path) -> None:
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["data"]["dataset"]["params"]["path"] == str((tmp_path / "a" / "data.npz").resolve())


def test_resume_from_another_folder_reads_the_data_the_run_started_with(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ib_cli: Any
) -> None:
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    write_arrays(elsewhere / "data.npz", seed=1, per_class=(5, 5, 5))  # another data set at the same relative path
    monkeypatch.chdir(elsewhere)
    result = ib_cli("resume", str(finished_run), "--quiet")
    assert result.rc == 0, result.output


def test_resume_refuses_data_that_changed_since_the_run_started(
    finished_run: Path, tmp_path: Path, ib_cli: Any
) -> None:
    write_arrays(tmp_path / "a" / "data.npz", seed=0, per_class=(12, 6, 2))  # one image fewer in class 2
    result = ib_cli("resume", str(finished_run), "--quiet")
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "is not the one the run started with" in message and "[12, 6, 3]" in message and "[12, 6, 2]" in message
