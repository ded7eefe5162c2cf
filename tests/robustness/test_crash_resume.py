"""kill -9 anywhere, full disks, failing writes: nothing written before is lost, and resume gets the same numbers.

A real ``ib`` process is SIGKILLed at chosen points (inside an optimisation step, half-way through a
checkpoint's temp file, between a checkpoint's rename and its manifest update, in the middle of an
evaluation) and at random points drawn from a seeded RNG, then ``ib resume``d. After every kill each
checkpoint listed in checkpoints.json must verify; at the end results.json and metrics.jsonl must equal
those of an uninterrupted run. tests/test_resume_kill.py covers one kill at an epoch boundary.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import TINY_DATA_PLUGIN, no_traceback, tiny_config, write_module

import ibcore
from ibcore.engine import checkpoint as ckpt
from ibcore.errors import ConfigError

# Kill points are installed in the child process itself, on stable interfaces (torch.Tensor.backward,
# os.replace, torch.save, an evaluator's compute), then the process SIGKILLs itself: for the files on disk
# that is the same as `kill -9` from outside at that instant, and it lands there every time.
KILLER = """\
import io, os, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counting(original, target, condition=lambda *a, **k: True):
    calls = [0]
    def wrapper(*args, **kwargs):
        if condition(*args, **kwargs):
            calls[0] += 1
            if calls[0] == target:
                die()
        return original(*args, **kwargs)
    return wrapper

event, _, arg = os.environ.get("IBTEST_KILL", "").partition(":")
count = int(arg.rpartition("@")[2]) if "@" in arg else 1
if event == "backward":  # in the Nth optimisation step, after its forward pass
    import torch
    torch.Tensor.backward = counting(torch.Tensor.backward, int(arg))
elif event == "replace":  # just before the Nth os.replace onto a file called NAME (NAME@N)
    name = arg.partition("@")[0]
    os.replace = counting(os.replace, count, lambda src, dst, *a, **k: os.path.basename(os.fspath(dst)) == name)
elif event == "torch_save":  # with half of the Nth checkpoint's bytes in its temp file
    import torch
    original_save, calls = torch.save, [0]
    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != int(arg):
            return original_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        die()
    torch.save = save
elif event == "evaluate":  # in the Nth compute() of the nll evaluator: mid-way through an evaluation
    import ibcore
    nll = type(ibcore.build("evaluator", "nll", context=ibcore.BuildContext(num_classes=2, class_counts=(1, 1))))
    nll.compute = counting(nll.compute, int(arg))

from ibcore.cli import main
sys.exit(main(sys.argv[1:]))
"""

# mnist_lt 50/20 (1,339 training images), two runs (mixup; focal with a re-sampling stage), 4 epochs of
# 6 steps, a checkpoint every epoch: resuming must restore weights, momentum, the mixer's and the
# sampler's RNG streams and the stage.
CRASH_CONFIG: dict[str, Any] = {
    "seed": 5,
    "data": {
        "dataset": {"name": "mnist_lt", "params": {"imbalance_ratio": 50, "test_per_class": 20}},
        "batch_size": 256,
    },
    # the sequential reference path, so that each run calls backward() once per step (fused: one call per group)
    "trainer": {
        "epochs": 4,
        "eval_every": 2,
        "checkpoint_every": 1,
        "keep_checkpoints": 3,
        "device": "cpu",
        "fused": "off",
    },
    "defaults": {
        "backbone": {"name": "small_cnn", "params": {"width": 4}},
        "optimizer": {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "milestones": [3]}},
        "loss": {"name": "cross_entropy"},
    },
    "runs": [
        {"name": "mixup", "mixer": {"name": "input_mixup"}},
        {
            "name": "drs",
            "loss": {"name": "focal", "params": {"gamma": 1.0}},
            "stages": [{"from_epoch": 2, "sampler": {"name": "class_balanced"}}],
        },
    ],
    "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}, {"name": "nll"}],
}
STEPS_PER_EPOCH = 6  # ceil(1339 / 256)
TIMEOUT = 300


class Workspace:
    """The killer script, the config and helpers to start ``ib`` processes in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.killer = root / "killer.py"
        self.killer.write_text(KILLER, encoding="utf-8")
        self.config = root / "exp.yaml"
        self.config.write_text(json.dumps(CRASH_CONFIG), encoding="utf-8")

    def start(self, args: list[str], kill: str = "") -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IB_")}
        env.update(IBTEST_KILL=kill, PYTHONUNBUFFERED="1")
        return subprocess.Popen(
            [sys.executable, str(self.killer), *args, "--quiet"],
            cwd=self.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, args: list[str], kill: str = "") -> tuple[int, str]:
        process = self.start(args, kill)
        _, err = process.communicate(timeout=TIMEOUT)
        return process.returncode, err.decode(errors="replace")


def run_dir_under(folder: Path) -> Path:
    (run_dir,) = folder.iterdir()
    return run_dir


def manifest(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "checkpoints" / ckpt.MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def assert_checkpoints_intact(run_dir: Path) -> list[int]:
    """Every checkpoint the manifest lists exists, matches its SHA-256 and loads (weights_only); returns the epochs."""
    entries = manifest(run_dir)
    epochs = [entry["epoch"] for entry in entries]
    assert epochs == sorted(set(epochs)), epochs
    for entry in entries:
        path = run_dir / "checkpoints" / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], f"{path.name} is corrupt"
        state = ckpt.load_checkpoint(path)
        assert state["epoch"] == entry["epoch"] and set(state["runs"]) == {"mixup", "drs"}
    ibcore.load_experiment(run_dir / "config.yaml")  # the resolved config is intact too
    return epochs


def without_timings(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the same experiment trained without interruption."""
    workspace = Workspace(tmp_path_factory.mktemp("reference"))
    rc, err = workspace.finish(["run", str(workspace.config), "--out", "out"])
    assert rc == 0, err
    return run_dir_under(workspace.root / "out")


def assert_same_as(run_dir: Path, reference: Path) -> None:
    got = json.loads((run_dir / "results.json").read_text())["last"]
    assert got == json.loads((reference / "results.json").read_text())["last"]  # bit for bit, on CPU
    assert without_timings(run_dir / "metrics.jsonl") == without_timings(reference / "metrics.jsonl")


@pytest.mark.slow
def test_kill_9_at_chosen_points_then_resume_gives_the_uninterrupted_numbers(tmp_path: Path, reference: Path) -> None:
    workspace = Workspace(tmp_path)
    rc, err = workspace.finish(
        ["run", str(workspace.config), "--out", "out"], kill=f"backward:{2 * STEPS_PER_EPOCH + 5}"
    )
    assert rc == -signal.SIGKILL, err
    run_dir = run_dir_under(tmp_path / "out")
    assert assert_checkpoints_intact(run_dir) == [1]  # killed in epoch 2, after the first checkpoint
    assert not (run_dir / "results.json").exists()

    resume = ["resume", str(run_dir)]
    kills = [
        ("torch_save:1", [1]),  # half of epoch-0002.pt's bytes in a temp file: never listed, never read
        ("replace:checkpoints.json@1", [1]),  # epoch-0002.pt renamed into place, the manifest not yet updated
        ("evaluate:2", [1]),  # the first run evaluated after epoch 2, the second not yet
        ("replace:checkpoints.json@2", [1, 2]),  # epoch 2 saved; killed while recording epoch 3
    ]
    for kill, epochs in kills:
        rc, err = workspace.finish(resume, kill=kill)
        assert rc == -signal.SIGKILL, f"{kill} did not happen: rc={rc}\n{err}"
        assert assert_checkpoints_intact(run_dir) == epochs, kill
    rc, err = workspace.finish(resume)
    assert rc == 0, err
    assert assert_checkpoints_intact(run_dir) == [2, 3, 4]
    assert_same_as(run_dir, reference)


def random_kill_point(rng: random.Random, epochs_left: int) -> str:
    """A kill point drawn from ``rng`` that the remaining ``epochs_left`` epochs are sure to reach: inside a random
    optimisation step, half-way through the first checkpoint, before the first manifest update, or mid-way through
    the first evaluation (every process that trains evaluates at least once: the last epoch always does)."""
    kind = rng.choice(["backward", "backward", "backward", "torch_save", "replace", "evaluate"])
    if kind == "backward":  # the sequential path: each of the 2 runs calls backward() once per step
        return f"backward:{rng.randint(1, 2 * STEPS_PER_EPOCH * epochs_left)}"
    return {"torch_save": "torch_save:1", "replace": "replace:checkpoints.json@1", "evaluate": "evaluate:1"}[kind]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_numbers(tmp_path: Path, reference: Path) -> None:
    """Kill points drawn from a seeded RNG, in units of the run's own progress (steps, checkpoints, evaluations)
    rather than seconds, so they land at the same places on a fast or a slow, busy machine."""
    rng = random.Random(20240611)
    workspace = Workspace(tmp_path)
    kill = random_kill_point(rng, CRASH_CONFIG["trainer"]["epochs"])
    rc, err = workspace.finish(["run", str(workspace.config), "--out", "out"], kill=kill)
    assert rc == -signal.SIGKILL, f"{kill} did not happen: rc={rc}\n{err}"
    run_dir = run_dir_under(tmp_path / "out")
    killed = [kill]
    for _ in range(3):
        saved = assert_checkpoints_intact(run_dir)
        if not saved:  # killed before the first checkpoint: nothing to resume, start again
            shutil.rmtree(run_dir)
            args = ["run", str(workspace.config), "--out", "out"]
            epochs_left = CRASH_CONFIG["trainer"]["epochs"]
        else:
            args, epochs_left = ["resume", str(run_dir)], CRASH_CONFIG["trainer"]["epochs"] - saved[-1]
        kill = random_kill_point(rng, epochs_left)
        rc, err = workspace.finish(args, kill=kill)
        assert rc == -signal.SIGKILL, f"{kill} did not happen: rc={rc}\n{err}"
        killed.append(kill)
        run_dir = run_dir_under(tmp_path / "out")
    assert assert_checkpoints_intact(run_dir), killed
    rc, err = workspace.finish(["resume", str(run_dir)])
    assert rc == 0, f"after kills at {killed}: {err}"
    assert_same_as(run_dir, reference)


# --------------------------------------------------------------------------------------------
# Write failures inside save_checkpoint: the previous checkpoint and manifest survive


def _failing_torch_save(original: Callable[..., Any]) -> Callable[..., Any]:
    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:100])  # some bytes reached the temp file, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def _fail_replace_onto(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fspath(dst)) == name:
            raise OSError(errno.EIO, "Input/output error")
        original(src, dst, *args, **kwargs)

    return replace


def _fail_fsync(original: Callable[..., Any]) -> Callable[..., Any]:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    return fsync


@pytest.mark.parametrize(
    "failure",
    ["torch.save (disk full)", "fsync of the temp file", "rename into place", "manifest update"],
)
def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_and_manifest_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 1, {"format": 1, "epoch": 1, "w": torch.arange(4.0)}, keep=1)
    good_manifest = (directory / ckpt.MANIFEST).read_bytes()
    good_checkpoint = (directory / "epoch-0001.pt").read_bytes()
    if failure.startswith("torch.save"):
        monkeypatch.setattr(torch, "save", _failing_torch_save(torch.save))
    elif failure.startswith("fsync"):
        monkeypatch.setattr(os, "fsync", _fail_fsync(os.fsync))
    elif failure.startswith("rename"):
        monkeypatch.setattr(os, "replace", _fail_replace_onto("epoch-0002.pt", os.replace))
    else:
        monkeypatch.setattr(os, "replace", _fail_replace_onto(ckpt.MANIFEST, os.replace))
    with pytest.raises(OSError):
        # keep=1: had the manifest been updated, epoch 1 would be deleted
        ckpt.save_checkpoint(directory, 2, {"format": 1, "epoch": 2, "w": torch.ones(4)}, keep=1)
    monkeypatch.undo()
    assert (directory / ckpt.MANIFEST).read_bytes() == good_manifest
    assert (directory / "epoch-0001.pt").read_bytes() == good_checkpoint
    assert not list(directory.glob("*.tmp")), "a temp file was left behind"
    assert ckpt.load_latest(directory)["epoch"] == 1


def test_atomic_writes_respect_the_umask(tmp_path: Path) -> None:
    from ibcore.files import atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"format": 1, "epoch": 1}, keep=1)
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "checkpoints" / "epoch-0001.pt").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------
# Full disks and read-only folders during `ib run`


@pytest.fixture
def tiny_experiment(tmp_path: Path, isolated_plugins: None) -> Callable[..., Path]:
    """``tiny_experiment(**trainer)``: a config on the synthetic 8x8 data set (seconds), with its plugin module."""
    write_module(tmp_path, "ibtest_tiny_data", TINY_DATA_PLUGIN)

    def write(**trainer: Any) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(json.dumps(tiny_config(**trainer)), encoding="utf-8")
        return path

    return write


def test_a_read_only_output_folder_is_reported_before_training(
    ib_cli: Callable[..., Any], tmp_path: Path, tiny_experiment: Callable[..., Path]
) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        try:
            (read_only / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("this user can write into a 0o555 folder (root): chmod cannot simulate a read-only disk")
        result = ib_cli("run", str(tiny_experiment()), "--quiet", "--out", str(read_only / "runs"))
        assert result.rc == 1 and no_traceback(result.output)
        assert "cannot write the run directory" in " ".join(result.err.split())
        assert not (read_only / "runs").exists()
    finally:
        read_only.chmod(0o755)


@pytest.mark.parametrize(
    ("failing", "error"),
    [("mkdir", errno.EROFS), ("write_bytes", errno.ENOSPC)],
    ids=["read-only file system", "disk already full"],
)
def test_an_unwritable_disk_is_reported_before_training_even_as_root(
    ib_cli: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_experiment: Callable[..., Path],
    failing: str,
    error: int,
) -> None:
    # chmod cannot stop root; a file system that refuses every write under `out` can be simulated for anyone
    out = tmp_path / "out"
    original = getattr(Path, failing)

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == out or out in self.parents:
            raise OSError(error, os.strerror(error), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, failing, refuse)
    result = ib_cli("run", str(tiny_experiment()), "--quiet", "--out", str(out))
    monkeypatch.undo()
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert f"cannot write the run directory under {out}" in message and os.strerror(error) in message
    assert not list(out.glob("*/config.yaml"))  # nothing was written


def test_a_full_disk_during_ib_run_is_a_clear_error_and_keeps_the_last_checkpoint(
    ib_cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_experiment: Callable[..., Path]
) -> None:
    original, calls = torch.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    result = ib_cli("run", str(tiny_experiment(epochs=3)), "--quiet", "--out", str(tmp_path / "out"))
    monkeypatch.undo()
    run_dir = run_dir_under(tmp_path / "out")
    assert [e["epoch"] for e in manifest(run_dir)] == [1]
    assert result.rc == 1 and no_traceback(result.output)
    assert "No space left on device" in result.err and "epoch-0002.pt" in result.err


def test_resume_removes_temp_files_left_by_a_killed_save(
    ib_cli: Callable[..., Any], tmp_path: Path, tiny_experiment: Callable[..., Path]
) -> None:
    assert ib_cli("run", str(tiny_experiment(epochs=2)), "--quiet", "--out", str(tmp_path / "out")).rc == 0
    run_dir = run_dir_under(tmp_path / "out")
    checkpoints = run_dir / "checkpoints"
    # as if killed while writing the second checkpoint: its temp file is there, the manifest lists epoch 1 only
    entries = manifest(run_dir)
    (checkpoints / entries[-1]["file"]).rename(checkpoints / ".epoch-0002.pt.k1ll3d.tmp")
    (checkpoints / ckpt.MANIFEST).write_text(json.dumps(entries[:-1]), encoding="utf-8")
    assert ib_cli("resume", str(run_dir), "--quiet").rc == 0
    assert not list(checkpoints.glob("*.tmp"))


def test_resume_of_a_directory_that_is_not_a_run_or_has_no_checkpoint_is_a_clear_error(
    ib_cli: Callable[..., Any], tmp_path: Path
) -> None:
    result = ib_cli("resume", str(tmp_path))
    assert result.rc == 1 and "is not an ibcore run directory (no config.yaml)" in " ".join(result.err.split())
    (tmp_path / "config.yaml").write_text(json.dumps(CRASH_CONFIG), encoding="utf-8")
    result = ib_cli("resume", str(tmp_path), "--quiet")  # killed before its first checkpoint: starts again
    assert result.rc == 0 and no_traceback(result.output), result.output
    assert "training starts from the beginning" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["last"]
    (tmp_path / "config.yaml").write_text("seed: [", encoding="utf-8")
    result = ib_cli("resume", str(tmp_path))
    assert result.rc == 1 and "not valid YAML" in result.output
    with pytest.raises(ConfigError):
        ibcore.load_experiment(tmp_path / "config.yaml")
