"""Configs composed from several files with ``extends``, and ``ib validate --print`` showing the result."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import ibcore
from ibcore import ConfigError, registry_snapshot
from ibcore.config import experiment_json_schema, resolved_config

BASE = """\
seed: 7
data:
  dataset: {name: mnist_lt, params: {imbalance_ratio: 50}}
  batch_size: 64
trainer: {epochs: 10, eval_every: 5, device: cpu}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: 0.1, momentum: 0.9, milestones: [6, 8]}}
runs:
  - name: ce
    loss: {name: cross_entropy}
  - name: focal
    loss: {name: focal, params: {gamma: 2.0}}
evaluators: [{name: accuracy}, {name: shot_accuracy}, {name: ece}]
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(text, name="exp.yaml")`` writes a file under a temporary folder (sub-folders allowed)."""

    def _write(text: str, name: str = "exp.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


def issues_of(source: Any, overrides: list[str] | None = None) -> list[tuple[str, str]]:
    return [(issue.path, issue.message) for issue in ibcore.validate(source, overrides=overrides)]


def error_of(source: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        ibcore.load_experiment(source)
    return caught.value


# --------------------------------------------------------------------------------------------
# Merging


def test_an_extending_file_changes_only_what_it_writes(write: Callable[..., Path]) -> None:
    write(BASE, "base.yaml")
    child = write(
        """\
        extends: base.yaml
        trainer: {epochs: 4}                                  # merged key by key: eval_every and device stay
        data: {dataset: {params: {imbalance_ratio: 10}}}      # the dataset keeps its name
        defaults:
          optimizer: {params: {milestones: [2, 3]}}           # a list replaces the base's list
        """
    )
    experiment = ibcore.load_experiment(child)
    assert experiment.seed == 7
    assert (experiment.trainer.epochs, experiment.trainer.eval_every, experiment.trainer.device) == (4, 5, "cpu")
    assert experiment.data.dataset.name == "mnist_lt" and experiment.data.dataset.params == {"imbalance_ratio": 10}
    assert experiment.data.batch_size == 64
    optimizer = experiment.defaults.optimizer
    assert optimizer is not None and optimizer.params == {"lr": 0.1, "momentum": 0.9, "milestones": [2, 3]}
    assert [run.name for run in experiment.runs] == ["ce", "focal"]
    assert [e.name for e in experiment.evaluators] == ["accuracy", "shot_accuracy", "ece"]


def test_runs_is_a_list_so_an_extending_file_replaces_it(write: Callable[..., Path]) -> None:
    write(BASE, "base.yaml")
    child = write(
        """\
        extends: base.yaml
        runs:
          - name: focal
            loss: {name: focal, params: {gamma: 1.0}}
        """
    )
    experiment = ibcore.load_experiment(child)
    assert [run.name for run in experiment.runs] == ["focal"]
    assert experiment.runs[0].loss is not None and experiment.runs[0].loss.params == {"gamma": 1.0}


def test_a_component_whose_name_changes_is_replaced_whole(write: Callable[..., Path]) -> None:
    # Deep-merging {name: adam} into sgd's mapping would hand sgd's momentum to adam: the new name wins whole.
    write(BASE, "base.yaml")
    child = write("extends: base.yaml\ndefaults:\n  optimizer: {name: adamw, params: {lr: 0.001}}\n")
    optimizer = ibcore.load_experiment(child).defaults.optimizer
    assert optimizer is not None and (optimizer.name, optimizer.params) == ("adamw", {"lr": 0.001})


def test_a_list_of_bases_merges_in_order_and_paths_are_relative_to_each_file(write: Callable[..., Path]) -> None:
    write(BASE, "common/base.yaml")
    write("extends: base.yaml\ntrainer: {epochs: 6, eval_every: 3}\n", "common/short.yaml")
    write("trainer: {eval_every: 2}\nseed: 11\n", "common/often.yaml")
    child = write(
        "extends: [../common/short.yaml, ../common/often.yaml]\nseed: 12\n",
        "recipes/exp.yaml",
    )
    experiment = ibcore.load_experiment(child)
    # short.yaml (over base.yaml), then often.yaml over both, then the file itself
    assert (experiment.trainer.epochs, experiment.trainer.eval_every, experiment.seed) == (6, 2, 12)


def test_a_mapping_may_extend_a_file_relative_to_the_working_directory(
    write: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(BASE, "base.yaml")
    monkeypatch.chdir(tmp_path)
    experiment = ibcore.load_experiment({"extends": "base.yaml", "trainer": {"epochs": 3}})
    assert experiment.trainer.epochs == 3 and experiment.seed == 7


def test_overrides_apply_to_the_composed_config(write: Callable[..., Path]) -> None:
    write(BASE, "base.yaml")
    child = write("extends: base.yaml\n")
    assert ibcore.load_experiment(child, overrides=["runs.focal.loss.params.gamma=0.5"]).run("focal").loss.params == {
        "gamma": 0.5
    }
    assert issues_of(child, ["extends=other.yaml"]) == [
        ("extends", "is resolved when the file is read; --set cannot change it: write extends in the file")
    ]


# --------------------------------------------------------------------------------------------
# Mistakes


def test_a_cycle_is_refused_with_the_chain_of_files(write: Callable[..., Path], tmp_path: Path) -> None:
    first = write("extends: second.yaml\n", "first.yaml")
    write("extends: [base.yaml, first.yaml]\n", "second.yaml")
    write(BASE, "base.yaml")
    error = error_of(first)
    assert error.source == str(tmp_path / "second.yaml")
    [issue] = error.issues
    assert issue.path == "extends[1]"
    chain = " → ".join(str(tmp_path / name) for name in ("first.yaml", "second.yaml", "first.yaml"))
    assert issue.message == f"'first.yaml' closes a cycle of extends: {chain}"
    itself = write("extends: self.yaml\n", "self.yaml")
    assert [i.message for i in error_of(itself).issues] == [
        f"'self.yaml' closes a cycle of extends: {itself} → {itself}"
    ]


def test_a_missing_base_is_an_error_at_extends(write: Callable[..., Path], tmp_path: Path) -> None:
    child = write("extends: [base.yaml, nope.yaml]\n")
    write(BASE, "base.yaml")
    error = error_of(child)
    assert error.source == str(child)
    assert [(i.path, i.message) for i in error.issues] == [
        (
            "extends[1]",
            f"'nope.yaml': the file {tmp_path / 'nope.yaml'} does not exist (extends paths are relative to this file)",
        )
    ]


@pytest.mark.parametrize(
    ("value", "got"), [("5", "a int"), ("[]", "an empty list"), ("[base.yaml, 3]", "a list"), ("{a: b}", "a dict")]
)
def test_extends_must_name_files(write: Callable[..., Path], value: str, got: str) -> None:
    write(BASE, "base.yaml")
    [(where, message)] = issues_of(write(f"extends: {value}\n"))
    assert where == "extends"
    assert message == f"expected a file path or a list of file paths (relative to this file), got {got}"


def test_a_base_file_is_read_as_safely_as_the_config(write: Callable[..., Path], tmp_path: Path) -> None:
    base = write("seed: !!python/object/apply:os.system ['echo hacked']\n", "base.yaml")
    error = error_of(write("extends: base.yaml\n"))
    assert error.source == str(base)
    assert "YAML tags that construct Python objects are not allowed" in error.issues[0].message
    write(
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e]\n",
        "bomb.yaml",
    )
    error = error_of(write("extends: bomb.yaml\n"))
    assert "expands to more than 200000 values" in error.issues[0].message


def test_the_json_schema_accepts_extends() -> None:
    extends = experiment_json_schema()["properties"]["extends"]
    assert {"type": "string"} in extends["anyOf"]
    assert {"items": {"type": "string"}, "type": "array"} in extends["anyOf"]
    assert "relative to this file" in extends["description"]


# --------------------------------------------------------------------------------------------
# Plugins next to a base file


@pytest.fixture
def isolated_imports() -> Iterator[None]:
    before = set(sys.modules)
    with registry_snapshot():
        yield
    for name in set(sys.modules) - before:
        if name.startswith("ibtest_"):
            del sys.modules[name]


def test_plugins_listed_in_a_base_are_found_next_to_it(write: Callable[..., Path], isolated_imports: None) -> None:
    write(
        "from ibcore import register_loss\nregister_loss('ibtest_shared_loss')(lambda params, context: None)\n",
        "common/ibtest_shared.py",
    )
    write("plugins: [ibtest_shared]\n" + BASE, "common/base.yaml")
    child = write(
        "extends: ../common/base.yaml\nruns: [{name: mine, loss: {name: ibtest_shared_loss}}]\n", "a/exp.yaml"
    )
    assert ibcore.load_experiment(child).run("mine").loss.name == "ibtest_shared_loss"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# ib validate --print, ib run


def test_validate_print_shows_the_resolved_config_as_yaml(
    ib_cli: Callable[..., Any], write: Callable[..., Path]
) -> None:
    write(BASE, "base.yaml")
    child = write("extends: base.yaml\ntrainer: {epochs: 4}\n")
    result = ib_cli("validate", str(child), "--print", "--set", "seed=3")
    assert result.rc == 0
    printed = yaml.safe_load(result.out)
    assert printed == resolved_config(ibcore.load_experiment(child, overrides=["seed=3"]))
    assert "extends" not in printed and printed["seed"] == 3
    # every default filled in, as config.yaml in a run directory
    assert printed["trainer"]["epochs"] == 4 and printed["trainer"]["checkpoint_every"] == 10
    assert printed["data"]["num_workers"] == 0 and printed["trainer"]["distributed"]["mode"] == "data_parallel"
    assert f"{child}: valid (2 runs: ce, focal)" in result.err  # the report leaves stdout to the YAML
    assert ibcore.load_experiment(printed) == ibcore.load_experiment(child, overrides=["seed=3"])


def test_validate_print_of_several_configs_and_of_an_invalid_one(
    ib_cli: Callable[..., Any], write: Callable[..., Path]
) -> None:
    one, two = write(BASE, "one.yaml"), write("extends: one.yaml\nseed: 1\n", "two.yaml")
    result = ib_cli("validate", str(one), str(two), "--print")
    assert result.rc == 0
    documents = list(yaml.safe_load_all(result.out))
    assert [d["seed"] for d in documents] == [7, 1]
    assert f"--- # {one}" in result.out and f"--- # {two}" in result.out
    broken = write("extends: one.yaml\ntrainer: {epochs: 0}\n", "broken.yaml")
    result = ib_cli("validate", str(broken), "--print")
    assert result.rc == 1 and result.out == ""
    assert "trainer.epochs" in result.err


def test_ib_run_trains_the_composed_config(
    ib_cli: Callable[..., Any], write: Callable[..., Path], tmp_path: Path
) -> None:
    write(BASE, "base.yaml")
    child = write(
        """\
        extends: base.yaml
        data: {dataset: {params: {imbalance_ratio: 100, test_per_class: 10}}, batch_size: 256}
        trainer: {epochs: 1, eval_every: 1}
        runs: [{name: ce, loss: {name: cross_entropy}}]
        evaluators: [{name: accuracy}]
        """
    )
    result = ib_cli("run", str(child), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 0, result.output
    [run_dir] = (tmp_path / "out").iterdir()
    written = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert "extends" not in written
    assert written["seed"] == 7 and written["trainer"]["device"] == "cpu" and written["data"]["batch_size"] == 256
    assert [run["name"] for run in written["runs"]] == ["ce"]
    assert json.loads((run_dir / "origin.json").read_text(encoding="utf-8"))["config"] == str(child)
