"""Files crafted to run code or to break ibcore: checkpoints, manifests, YAML tags, names, data and results files.

What is trusted is small and explicit: the modules a config lists under ``plugins:`` (and the run
directory ``ib resume`` is pointed at, whose config.yaml carries that list). Everything else is data:
a checkpoint is loaded with ``weights_only=True``, YAML with a safe loader, and a component name is
looked up in the registry, never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import (
    TINY_DATA_PLUGIN,
    base_config,
    count_example,
    fuzz_settings,
    no_traceback,
    tiny_config,
    write_module,
)
from hypothesis import given
from hypothesis import strategies as st

import ibcore
from ibcore.engine import checkpoint as ckpt
from ibcore.errors import CheckpointError


class MarkerPayload:
    """Unpickling this runs ``exec`` — creating the marker file — if the loader allows it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint(path: Path, how: str, marker: Path) -> None:
    state = {"format": 1, "epoch": 1, "runs": {}, "payload": MarkerPayload(marker), "other": SystemPayload(marker)}
    if how == "torch zip":
        torch.save(state, path)
    elif how == "torch legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))


def record_in_manifest(directory: Path, entries: list[tuple[str, int]]) -> None:
    listed = [
        {"file": name, "epoch": epoch, "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest()}
        for name, epoch in entries
    ]
    (directory / ckpt.MANIFEST).write_text(json.dumps(listed), encoding="utf-8")


@pytest.mark.parametrize("how", ["torch zip", "torch legacy", "plain pickle"])
def test_ib_resume_refuses_a_checkpoint_that_would_run_code(
    ib_cli: Callable[..., Any], tmp_path: Path, how: str
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(base_config()), encoding="utf-8")
    write_checkpoint(run_dir / "checkpoints" / "epoch-0001.pt", how, marker)
    # listed with the right checksum: only the loader can refuse it
    record_in_manifest(run_dir / "checkpoints", [("epoch-0001.pt", 1)])
    result = ib_cli("resume", str(run_dir), "--quiet")
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "no usable checkpoint" in message and "epoch-0001.pt" in message
    assert not marker.exists(), "the checkpoint ran code"


@pytest.fixture
def tiny_run(ib_cli: Callable[..., Any], tmp_path: Path, isolated_plugins: None) -> Path:
    """A finished two-epoch run on the synthetic data set (two checkpoints)."""
    write_module(tmp_path, "ibtest_tiny_data", TINY_DATA_PLUGIN)
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_config(epochs=2, keep_checkpoints=2)), encoding="utf-8")
    assert ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out")).rc == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    return run_dir


def test_a_hostile_newest_checkpoint_is_skipped_for_the_previous_good_one(
    ib_cli: Callable[..., Any], tmp_path: Path, tiny_run: Path
) -> None:
    marker = tmp_path / "pwned"
    checkpoints = tiny_run / "checkpoints"
    write_checkpoint(checkpoints / "epoch-0002.pt", "torch zip", marker)
    record_in_manifest(checkpoints, [("epoch-0001.pt", 1), ("epoch-0002.pt", 2)])
    result = ib_cli("resume", str(tiny_run), "--quiet")
    assert result.rc == 0, result.output
    assert "skipped bad checkpoints" in result.output and "epoch-0002.pt" in result.output
    assert not marker.exists()
    assert json.loads((tiny_run / "results.json").read_text())["last"][0]["status"] == "ok"


# --------------------------------------------------------------------------------------------
# checkpoints.json is data too


def test_a_crafted_manifest_cannot_make_a_save_delete_files_outside_the_folder(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "checkpoints"
    victim = tmp_path / "run" / "victim.txt"
    ckpt.save_checkpoint(directory, 1, {"format": 1, "epoch": 1}, keep=2)
    victim.write_text("precious", encoding="utf-8")
    entries = json.loads((directory / ckpt.MANIFEST).read_text())
    entries.insert(0, {"file": "../victim.txt", "epoch": 0, "sha256": "0" * 64})
    (directory / ckpt.MANIFEST).write_text(json.dumps(entries), encoding="utf-8")
    ckpt.save_checkpoint(directory, 2, {"format": 1, "epoch": 2}, keep=2)  # drops the oldest entry
    assert victim.exists(), "a save deleted a file outside the checkpoint folder"


MALFORMED_MANIFESTS = {
    "epoch not a number": [{"file": "epoch-0001.pt", "epoch": "one", "sha256": "0"}],
    "file not a string": [{"file": 5, "epoch": 1, "sha256": "0"}],
    "file null": [{"file": None, "epoch": 1, "sha256": None}],
    "no epoch": [{"file": "epoch-0001.pt", "sha256": "0"}],
    "file is the folder": [{"file": ".", "epoch": 1, "sha256": "0"}],
}


@pytest.mark.parametrize("entries", list(MALFORMED_MANIFESTS.values()), ids=list(MALFORMED_MANIFESTS))
def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path: Path, entries: list[dict[str, Any]]) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "epoch-0001.pt").write_bytes(b"x")
    (directory / ckpt.MANIFEST).write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(CheckpointError):
        ckpt.load_latest(directory)
    ckpt.save_checkpoint(directory, 2, {"format": 1, "epoch": 2}, keep=1)  # a save ignores what it cannot read
    assert ckpt.load_latest(directory)["epoch"] == 2


# --------------------------------------------------------------------------------------------
# YAML that would construct Python objects


@pytest.mark.parametrize(
    "where",
    [
        "seed: {tag}",
        "data:\n  dataset: {{name: mnist_lt, params: {{imbalance_ratio: {tag} }}}}",  # a space ends the tag
        "runs:\n  - name: ce\n    loss: {{name: focal, params: {{gamma: {tag} }}}}",
        "evaluators: [{tag} ]",
    ],
    ids=["root", "dataset params", "loss params", "list item"],
)
@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/object/apply:subprocess.check_call [[touch, '{marker}']]",
        "!!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]",
        "!!python/name:os.system",
        "!!python/module:os",
    ],
    ids=["apply-os.system", "new-os.system", "subprocess", "exec", "name", "module"],
)
def test_yaml_tags_that_construct_python_objects_are_refused_and_nothing_runs(
    ib_cli: Callable[..., Any], tmp_path: Path, where: str, tag: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "tagged.yaml"
    path.write_text(where.format(tag=tag.format(marker=marker)) + "\n", encoding="utf-8")
    for command in (["validate", str(path)], ["run", str(path), "--quiet", "--out", str(tmp_path / "out")]):
        result = ib_cli(*command)
        assert result.rc == 1 and no_traceback(result.output), result.output
        assert "YAML tags that construct Python objects are not allowed" in " ".join(result.output.split())
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_python_tag_in_an_override_is_refused_and_nothing_runs(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(base_config()), encoding="utf-8")
    result = ib_cli("validate", str(path), "--set", f"seed=!!python/object/apply:os.system ['touch {marker}']")
    assert result.rc == 1 and no_traceback(result.output)
    assert "cannot parse override" in result.output
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# A component name is looked up, never imported

SENTINEL = "import pathlib\npathlib.Path(__file__).with_suffix('.imported').touch()\ndef build(*a, **k):\n    pass\n"
COMPONENT_SLOTS: list[tuple[tuple[str | int, ...], str]] = [
    (("data", "dataset"), "data.dataset.name"),
    (("runs", 0, "loss"), "runs[0].loss.name"),
    (("runs", 0, "backbone"), "runs[0].backbone.name"),
    (("runs", 0, "optimizer"), "runs[0].optimizer.name"),
    (("runs", 0, "sampler"), "runs[0].sampler.name"),
    (("runs", 0, "mixer"), "runs[0].mixer.name"),
    (("runs", 1, "stages", 0, "sampler"), "runs[1].stages[0].sampler.name"),
    (("evaluators", 0), "evaluators[0].name"),
]
modules = st.sampled_from(
    [
        "os",
        "os.path",
        "subprocess",
        "builtins",
        "importlib",
        "shutil",
        "pickle",
        "ibtest_sentinel",
        "ib_plugins_builtin.losses",
        "ib_plugins_builtin.losses._softmax",
        "ibcore.cli",
        "torch",
        "torchvision.models",
        "local:ibtest_sentinel",
        "local:os",
    ]
)
attributes = st.sampled_from(
    [
        "system",
        "build",
        "build_focal",
        "main",
        "rmtree",
        "loads",
        "eval",
        "exec",
        "__import__",
        "import_module",
        "load",
        "resnet18",
    ]
)
import_like_names = st.one_of(
    st.tuples(modules, attributes).map(":".join),
    st.tuples(modules, attributes).map(".".join),
    modules,
    st.tuples(modules, st.sampled_from([":", "::", ":."]), attributes).map("".join),
)


@pytest.fixture(scope="module")
def sentinel_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An importable module that leaves a mark if anything imports it."""
    folder = tmp_path_factory.mktemp("sentinel")
    write_module(folder, "ibtest_sentinel", SENTINEL)
    return folder


@fuzz_settings(300)
@given(st.sampled_from(COMPONENT_SLOTS), import_like_names)
def test_a_component_name_that_looks_like_an_import_path_is_an_unknown_name_and_imports_nothing(
    sentinel_module: Path, slot: tuple[tuple[str | int, ...], str], name: str
) -> None:
    count_example("names: import-path-like component names -> unknown-name issue, nothing imported")
    path, where = slot
    config = base_config()
    parent = config
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = {"name": name}
    before = set(sys.modules)
    sys.path.insert(0, str(sentinel_module))
    try:
        issues = {issue.path: issue.message for issue in ibcore.validate(config)}
    finally:
        sys.path.remove(str(sentinel_module))
    assert where in issues, issues
    assert "Unknown" in issues[where] or "has no provider" in issues[where], issues[where]
    assert "ibtest_sentinel" not in sys.modules and not (sentinel_module / "ibtest_sentinel.imported").exists()
    assert not {m for m in set(sys.modules) - before if not m.startswith(("ib_plugins_builtin", "torch", "numpy"))}


# --------------------------------------------------------------------------------------------
# Data files: CIFAR's python batches are pickles


def test_a_cifar_batch_that_would_run_code_is_refused(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": MarkerPayload(marker), b"labels": [0]}))
    config = base_config()
    config["data"]["dataset"] = {"name": "cifar10_lt", "params": {"root": str(tmp_path / "cifar")}}
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and "data_batch_1" in result.output
    assert not marker.exists(), "unpickling the data file ran code"


# --------------------------------------------------------------------------------------------
# `ib report` reads JSON only


def finished_run_dir(folder: Path, results: Any) -> Path:
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"class_counts": [5, 1]}), encoding="utf-8")
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def test_ib_report_never_imports_the_plugins_of_a_run_directory(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    run_dir = finished_run_dir(tmp_path / "run", {"last": [{"run": "ce", "status": "ok", "acc1": 50.0}]})
    config = base_config()
    config["plugins"] = ["ibtest_sentinel"]
    (run_dir / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    write_module(run_dir, "ibtest_sentinel", SENTINEL)
    (run_dir / "origin.json").write_text(json.dumps({"config": "x", "config_dir": str(run_dir)}), encoding="utf-8")
    result = ib_cli("report", str(run_dir))
    assert result.rc == 0 and "ce" in result.out
    assert "ibtest_sentinel" not in sys.modules and not (run_dir / "ibtest_sentinel.imported").exists()


@pytest.mark.parametrize(
    "results",
    [[], None, {"last": 5}, {"last": [1, 2]}, {"last": [{}]}],
    ids=["list", "null", "last-int", "rows-int", "row-without-run"],
)
def test_ib_report_on_a_malformed_results_file_is_a_clear_error(
    ib_cli: Callable[..., Any], tmp_path: Path, results: Any
) -> None:
    run_dir = finished_run_dir(tmp_path / "run", results)
    try:
        result = ib_cli("report", str(run_dir))
    except Exception as exc:  # noqa: BLE001 - what the user sees is a traceback
        pytest.fail(f"traceback: {type(exc).__name__}: {exc}")
    assert result.rc == 1 and "results.json" in result.err
