"""The reproduction recipes (examples/reproduce/): one protocol, published numbers on every run, and a run of the
whole CIFAR-10-LT table end to end on the CPU (a smoke run on a tiny array file in the npz layout of
shared/data/cifar10_lt100.npz)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ibcore
from ibcore.errors import ConfigError

REPRODUCE = Path(__file__).resolve().parents[1] / "examples" / "reproduce"
RECIPES = sorted(REPRODUCE.glob("cifar*_lt_if*.yaml"))  # the BagofTricks-protocol tables
METHODS = {
    "ce", "cb_focal", "ldam_drw", "balanced_softmax", "la_loss", "vs", "drs", "crt", "lws", "mixup", "remix", "mislas"
}  # fmt: skip
EXTRA = {"cifar100_lt_if100.yaml": {"lade"}}  # LADE publishes no CIFAR-10-LT number


def test_the_three_recipes_exist() -> None:
    assert [p.name for p in RECIPES] == ["cifar100_lt_if100.yaml", "cifar10_lt_if10.yaml", "cifar10_lt_if100.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_each_recipe_runs_every_method_under_the_bagoftricks_protocol(path: Path) -> None:
    experiment = ibcore.load_experiment(path)
    assert experiment.seeds == [0, 1, 2]
    assert {run.name for run in experiment.runs} == METHODS | EXTRA.get(path.name, set())
    assert {spec.name for spec in experiment.run("ce").posthoc} == {"posthoc_logit_adjustment", "tau_norm"}
    assert experiment.trainer.epochs == 200 and experiment.data.batch_size == 128
    for run in experiment.runs:
        assert run.backbone is not None and run.backbone.name == "resnet32", run.name
        sgd = run.optimizer.params if run.optimizer is not None else {}
        assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (0.1, 0.9, 2.0e-4), run.name
        assert sgd["milestones"] == [159, 179] and sgd["gamma"] == 0.01, run.name
    # every published number names its source; the IF 100 tables have a published value for every method
    references = [run.reference for run in experiment.runs] + [p.reference for p in experiment.run("ce").posthoc]
    assert all(r is None or r["source"] for r in references)
    if "if100" in path.name:
        assert all(r is not None and 0 < r["acc1"] < 100 for r in references)
    # published values name metric keys (acc1), not display labels
    assert all(set(r) <= {"source", "acc1"} for r in references if r is not None)


def write_tiny_cifar_npz(path: Path) -> None:
    """Ten classes of random 32x32 RGB images, long-tailed (20 down to 2), in the layout of cifar10_lt100.npz."""
    rng = np.random.default_rng(0)
    counts = [20, 14, 10, 7, 5, 4, 3, 2, 2, 2]
    labels = np.repeat(np.arange(10), counts).astype(np.uint8)
    test_labels = np.repeat(np.arange(10), 3).astype(np.uint8)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
        train_labels=labels,
        test_images=rng.integers(0, 256, (len(test_labels), 32, 32, 3), dtype=np.uint8),
        test_labels=test_labels,
        class_names=np.array([f"class{i}" for i in range(10)]),
    )


def test_the_cifar10_table_runs_end_to_end_on_the_cpu(tmp_path: Path, ib_cli: Any) -> None:
    """`ib run RECIPE --smoke` with the npz override of the recipe's header: every method, stage and seed trains."""
    data = tmp_path / "cifar10_lt100.npz"
    write_tiny_cifar_npz(data)
    dataset = "{name: array_file, params: {path: %s, mean: [0.4914, 0.4822, 0.4465], std: [0.2023, 0.1994, 0.2010]}}"
    result = ib_cli(
        "run", str(REPRODUCE / "cifar10_lt_if100.yaml"), "--smoke", "1", "--out", str(tmp_path / "runs"),
        "--set", f"data.dataset={dataset % data}", "--set", "seeds=[0, 1]", "--set", "data.batch_size=16",
        "--set", "trainer.device=cpu",
    )  # fmt: skip
    assert result.rc == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    payload = json.loads((run_dir / "results.json").read_text())
    assert {row["status"] for row in payload["last"]} == {"ok"}
    summary = {row["run"]: row for row in payload["summary"]}
    assert set(summary) == METHODS | {"ce+posthoc_logit_adjustment", "ce+tau_norm"}
    for method, row in summary.items():
        assert row["seeds"] == [0, 1] and row["metrics"]["acc1"]["n"] == 2, method
        assert row["reference"]["source"] and "acc1" in row["difference"], method
    log = (run_dir / "train.log").read_text()
    assert "smoke run: epochs 1, 160, 161, 171, 191, 200 of 200" in log
    assert "a smoke run" in result.output and "published" in result.output


def test_only_trains_the_named_runs_and_says_which_names_exist(tmp_path: Path) -> None:
    from test_engine import tiny_config

    results = ibcore.run(tiny_config(epochs=1), out_dir=tmp_path, quiet=True, only=["focal"])
    assert [row["run"] for row in results.rows] == ["focal"]
    with pytest.raises(ConfigError) as caught:
        ibcore.run(tiny_config(epochs=1), out_dir=tmp_path, quiet=True, only=["focl"])
    assert "no run is called 'focl'; did you mean 'focal'?" in str(caught.value)
