"""``grid:`` in a run: one run per combination, each validated and trained like any run, with the best setting named
and the split it was chosen on said plainly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_engine import tiny_config

import ibcore
from ibcore.errors import ConfigError


def grid_config(**grid: Any) -> dict[str, Any]:
    config = tiny_config(epochs=2)
    config["runs"] = [{"name": "ce"}, {"name": "focal", "loss": {"name": "focal"}, "grid": grid}]
    return config


def test_a_grid_expands_into_one_run_per_combination_with_its_values() -> None:
    experiment = ibcore.load_experiment(
        grid_config(**{"loss.params.gamma": [0.5, 2], "optimizer.params.lr": [0.05, 0.1]})
    )
    names = [run.name for run in experiment.runs]
    assert names == [
        "ce", "focal[gamma=0.5,lr=0.05]", "focal[gamma=0.5,lr=0.1]", "focal[gamma=2,lr=0.05]", "focal[gamma=2,lr=0.1]"
    ]  # fmt: skip
    run = experiment.run("focal[gamma=2,lr=0.1]")
    assert run.loss is not None and run.loss.params == {"gamma": 2}
    # the run had no optimizer of its own: the grid starts from the default one and changes only lr
    assert run.optimizer is not None and run.optimizer.params == {
        **tiny_config()["defaults"]["optimizer"]["params"],
        "lr": 0.1,
    }
    assert run.grid is None


def test_a_grid_reaches_stages_and_keeps_the_rest_of_the_run() -> None:
    config = tiny_config(epochs=3)
    config["runs"] = [
        {
            "name": "drw",
            "loss": {"name": "cross_entropy"},
            "stages": [
                {"from_epoch": 1, "loss": {"name": "cross_entropy", "params": {"class_weights": {"name": "inverse"}}}}
            ],
            "grid": {"stages[0].from_epoch": [1, 2]},
        }
    ]
    experiment = ibcore.load_experiment(config)
    assert [(run.name, run.stages[0].from_epoch) for run in experiment.runs] == [
        ("drw[from_epoch=1]", 1),
        ("drw[from_epoch=2]", 2),
    ]
    assert all(run.stages[0].loss is not None for run in experiment.runs)


def test_every_combination_is_checked_and_an_issue_names_its_combination() -> None:
    issues = ibcore.validate(grid_config(**{"loss.params.gamma": [1.0, -2.0, "x"]}))
    paths = sorted(issue.path for issue in issues)
    assert paths == ["runs[1][gamma=-2.0].loss.params.gamma", "runs[1][gamma=x].loss.params.gamma"]


@pytest.mark.parametrize(
    ("grid", "path", "message"),
    [
        ({"loss.params.gamma": []}, "runs[1].grid.loss.params.gamma", "non-empty list"),
        ({"stages[3].from_epoch": [1]}, "runs[1].grid.stages[3].from_epoch", "no 'stages' list"),
        ({"name": ["a"]}, "runs[1].grid.name", "not a param path"),
        ({"loss..gamma": [1]}, "runs[1].grid.loss..gamma", "not a param path"),
        ({"a.b": list(range(40)), "c.d": list(range(40))}, "runs[1].grid", "1600 combinations"),
    ],
)
def test_a_broken_grid_is_refused_at_its_path(grid: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ibcore.load_experiment(grid_config(**grid))
    assert any(issue.path == path and message in issue.message for issue in caught.value.issues), caught.value.issues


def test_grid_runs_train_together_and_the_best_setting_is_named_with_its_split(tmp_path: Path) -> None:
    results = ibcore.run(grid_config(**{"loss.params.gamma": [0.5, 2]}), out_dir=tmp_path / "test", quiet=True)
    assert {row["run"] for row in results.rows} == {"ce", "focal[gamma=0.5]", "focal[gamma=2]"}
    log = (results.run_dir / "train.log").read_text()
    assert "grid focal: best of 2 settings is focal[gamma=" in log and "chosen on the TEST split" in log
    # with a validation split the trainer keeps each run's best epoch on it: the choice is made there
    from ibcore.report.grid import grid_notes

    best = [{**row, "acc1": 50.0 if row["run"] == "focal[gamma=2]" else 40.0} for row in results.rows]
    (note,) = grid_notes(results.rows, best, results.labels)
    assert "best of 2 settings is focal[gamma=2]" in note and "chosen on the validation split" in note
    # config.yaml holds the expanded runs, which `ib resume` reads as they are
    assert ibcore.load_experiment(results.run_dir / "config.yaml").run("focal[gamma=2]") is not None
