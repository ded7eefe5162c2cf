"""Kill a real ``ib run`` process mid-training, ``ib resume`` it, and get the uninterrupted numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = {
    "seed": 11,
    "data": {
        "dataset": {"name": "mnist_lt", "params": {"imbalance_ratio": 50, "test_per_class": 20}},
        "batch_size": 64,
    },
    "trainer": {"epochs": 6, "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 2, "device": "cpu"},
    "defaults": {
        "backbone": {"name": "small_cnn"},
        "optimizer": {"name": "sgd", "params": {"lr": 0.05, "milestones": [4]}},
        "loss": {"name": "cross_entropy"},
    },
    "runs": [
        {"name": "ce"},
        {
            "name": "ldam_drw",
            "backbone": {"name": "small_cnn", "params": {"classifier": "cosine"}},
            "loss": {"name": "ldam"},
            "stages": [{"from_epoch": 4, "loss": {"name": "ldam", "params": {"class_weights": {"name": "inverse"}}}}],
        },
        {"name": "mixup", "mixer": {"name": "input_mixup"}},
        {"name": "balanced", "sampler": {"name": "class_balanced"}},
    ],
    "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}, {"name": "nll"}],
}


def ib(*args: str) -> list[str]:
    return [sys.executable, "-m", "ibcore.cli", *args]


def checkpointed_epochs(run_dir: Path) -> list[int]:
    try:
        return [e["epoch"] for e in json.loads((run_dir / "checkpoints" / "checkpoints.json").read_text())]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_numbers(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(CONFIG))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    uninterrupted = subprocess.run(
        ib("run", str(config), "--quiet", "--out", str(tmp_path / "a")),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    (expected_dir,) = (tmp_path / "a").iterdir()

    process = subprocess.Popen(
        ib("run", str(config), "--quiet", "--out", str(tmp_path / "b")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    run_dir = None
    while time.monotonic() < deadline:
        dirs = list((tmp_path / "b").glob("exp-*")) if (tmp_path / "b").exists() else []
        if dirs and max(checkpointed_epochs(dirs[0]), default=0) >= 3:
            run_dir = dirs[0]
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert run_dir is not None, "the run never reached its third checkpoint"
    assert max(checkpointed_epochs(run_dir)) < 6, "the run finished before it could be killed"
    assert not (run_dir / "results.json").exists()

    resumed = subprocess.run(
        ib("resume", str(run_dir), "--quiet"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr

    expected = json.loads((expected_dir / "results.json").read_text())["last"]
    got = json.loads((run_dir / "results.json").read_text())["last"]
    assert got == expected  # bit-for-bit on CPU: every metric of every run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected_lines = [json.loads(line) for line in (expected_dir / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(lines) == strip(expected_lines)  # no duplicated or missing evaluation lines
