"""`ib run CONFIG --smoke` on every shipped example: each run and stage trains a batch, and the run directory is
complete. The CIFAR recipes read a tiny array file in their data's layout (nothing downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ibcore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(p for p in EXAMPLES.rglob("*.yaml") if "plugin-package" not in p.relative_to(EXAMPLES).parts)
CIFAR_NORMALISATION = "mean: [0.4914, 0.4822, 0.4465], std: [0.2023, 0.1994, 0.2010]"


def write_tiny_npz(path: Path, num_classes: int) -> None:
    """Random 32x32 RGB images, long-tailed (3 images for the head class down to 1), 1 test image per class."""
    rng = np.random.default_rng(0)
    counts = np.maximum(1, np.round(3 * 0.3 ** (np.arange(num_classes) / max(num_classes - 1, 1)))).astype(int)
    labels = np.repeat(np.arange(num_classes), counts)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
        train_labels=labels,
        test_images=rng.integers(0, 256, (num_classes, 32, 32, 3), dtype=np.uint8),
        test_labels=np.arange(num_classes),
    )


def test_every_example_is_covered() -> None:
    names = {str(p.relative_to(EXAMPLES)) for p in CONFIGS}
    assert {"quickstart.yaml", "cifar10_lt_ldam_drw.yaml", "reproduce/cifar100_lt_if100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_shipped_example_runs_as_a_smoke_run_on_the_cpu(path: Path, tmp_path: Path, ib_cli: Any) -> None:
    experiment = ibcore.load_experiment(path)
    overrides = ["trainer.device=cpu", "data.batch_size=8"]
    dataset = experiment.data.dataset.name
    if dataset.startswith("cifar"):
        data = tmp_path / "data.npz"
        write_tiny_npz(data, 100 if dataset == "cifar100_lt" else 10)
        overrides.append(f"data.dataset={{name: array_file, params: {{path: {data}, {CIFAR_NORMALISATION}}}}}")
    if experiment.seeds:
        overrides.append("seeds=[0]")  # one seed is enough to go through every run and stage
    args = [arg for override in overrides for arg in ("--set", override)]
    result = ib_cli("run", str(path), "--smoke", "1", "--quiet", "--out", str(tmp_path / "runs"), *args)
    assert result.rc == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "results.json", "results.md", "train.log"):
        assert (run_dir / name).is_file(), name
    rows = json.loads((run_dir / "results.json").read_text())["last"]
    assert {row["status"] for row in rows} == {"ok"}
    assert {row["method"] for row in rows} >= {run.name for run in experiment.runs}
    assert json.loads((run_dir / "meta.json").read_text())["smoke"] == 1
