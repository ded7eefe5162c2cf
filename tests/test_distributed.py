"""Distributed training under torchrun (gloo on the CPU): the split of each epoch, one set of files,
the same numbers as one process with the same global batch, resume, and the errors a user can meet.

The slow tests start real ``torchrun`` launches with two processes; everything here runs on the CPU
(NCCL is not exercised).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ibcore
from ibcore.config import load_experiment
from ibcore.config.schema import ComponentSpec
from ibcore.engine.batches import augment_batch
from ibcore.engine.checkpoint import load_checkpoint
from ibcore.engine.distributed import (
    Distributed,
    GlobalBatchNorm,
    check_resume_world,
    choose_backend,
    convert_batchnorm,
    eval_counts,
    eval_indices,
    launched_world,
    rank_indices,
)
from ibcore.engine.trainer import Trainer
from ibcore.errors import ConfigError, TrainingError
from ibcore.protocols import AugmentSpec
from ibcore.sampling import shard

SGD = {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


def experiment(
    epochs: int = 5, mode: str = "data_parallel", runs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Long-tailed MNIST (1548 training images: an even number, so two ranks split each epoch with no
    padding), random-crop augmentation, small_cnn with global-batch BatchNorm, two samplers."""
    return {
        "seed": 3,
        "data": {
            "dataset": {"name": "mnist_lt", "params": {"imbalance_ratio": 25, "test_per_class": 20, "augment": True}},
            "batch_size": 128,
        },
        "trainer": {
            "epochs": epochs,
            "eval_every": 1,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "device": "cpu",
            "fused": "off",
            # one memory layout for every rank count, so float32 sums differ only by the DDP reduction
            "channels_last": False,
            "distributed": {"mode": mode, "sync_batchnorm": True},
        },
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"width": 8}},
            "optimizer": SGD,
            "loss": {"name": "cross_entropy"},
        },
        "runs": runs or [{"name": "ce"}, {"name": "balanced", "sampler": {"name": "class_balanced"}}],
        "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}, {"name": "nll"}],
    }


# -- unit tests: the split, the checks, the pieces ---------------------------------------------


@pytest.mark.parametrize(
    ("length", "world", "batch", "drop_last"),
    [(1548, 2, 128, False), (1000, 4, 64, False), (999, 3, 96, False), (999, 3, 96, True)],
)
def test_the_ranks_batches_together_are_the_single_process_batches(
    length: int, world: int, batch: int, drop_last: bool
) -> None:
    stream = np.random.default_rng(0).permutation(length)
    local = batch // world
    per_rank = [rank_indices(stream, rank, world, batch, drop_last) for rank in range(world)]
    assert len({len(part) for part in per_rank}) == 1  # every rank runs the same number of equal steps
    steps = len(stream) // batch if drop_last else -(-len(stream) // batch)
    assert all(-(-len(part) // local) == steps for part in per_rank)  # = the single-process iterations
    padded = np.resize(stream, -(-length // world) * world)  # the documented rule: wrap to a multiple of world
    for step in range(steps):
        global_batch = np.concatenate([part[step * local : (step + 1) * local] for part in per_rank])
        expected = padded[step * batch : (step + 1) * batch]
        assert sorted(global_batch.tolist()) == sorted(expected.tolist())
        # rank r holds positions r, r + w, ... of each global batch
        for rank, part in enumerate(per_rank):
            assert part[step * local : (step + 1) * local].tolist() == expected[rank::world].tolist()


def test_the_last_uneven_slice_repeats_the_start_of_the_stream() -> None:
    stream = np.array([7, 3, 9, 1, 5])
    assert [shard(stream, r, 3).tolist() for r in range(3)] == [[7, 1], [3, 5], [9, 7]]
    assert [rank_indices(stream, r, 3, 3, False).tolist() for r in range(3)] == [[7, 1], [3, 5], [9, 7]]
    # drop_last cuts the stream to whole global batches first: nothing is repeated
    assert [rank_indices(stream, r, 3, 3, True).tolist() for r in range(3)] == [[7], [3], [9]]


def test_evaluation_blocks_cover_the_test_set_once() -> None:
    for n, world in [(200, 2), (7, 3), (2, 4)]:
        blocks = [eval_indices(n, rank, world) for rank in range(world)]
        assert np.concatenate(blocks).tolist() == list(range(n))
        assert [len(b) for b in blocks] == eval_counts(n, world)


def test_device_augmentation_of_a_slice_equals_those_rows_of_the_global_batch() -> None:
    spec = AugmentSpec(pad=2, flip=True, mean=(0.5,), std=(0.25,))
    images = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8)
    whole = augment_batch(images, spec, torch.Generator().manual_seed(4), True)
    for rank in range(2):
        part = augment_batch(images[rank::2], spec, torch.Generator().manual_seed(4), True, shard=(rank, 2))
        assert torch.equal(part, whole[rank::2])


def test_global_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    reference = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    reference.load_state_dict(model.state_dict())
    weight = model[1].weight
    converted = convert_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], GlobalBatchNorm) and converted[1].weight is weight  # same parameters
    assert converted.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_var, reference[1].running_var)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path) -> None:
    config = experiment()
    config["data"]["batch_size"] = 127
    two_ranks = Distributed(rank=0, world_size=2, mode="data_parallel", device=torch.device("cpu"))
    with pytest.raises(TrainingError, match="global batch, split evenly between the 2 processes: use a multiple"):
        Trainer(load_experiment(config), tmp_path, quiet=True, distributed=two_ranks)


def test_resuming_with_another_world_size_or_mode_is_refused() -> None:
    two = {"distributed": {"world_size": 2, "mode": "data_parallel"}}
    with pytest.raises(
        TrainingError,
        match=r"written by 2 processes in data_parallel mode, but this resume runs 1 "
        r"process.*torchrun --nproc_per_node=2 -m ibcore.cli resume runs/x",
    ):
        check_resume_world(two, Distributed(), "runs/x")
    with pytest.raises(TrainingError, match="in runs_parallel mode"):
        check_resume_world(two, Distributed(world_size=2, mode="runs_parallel"), "runs/x")
    with pytest.raises(TrainingError, match=r"written by 1 process, but this resume runs 4 processes"):
        check_resume_world({"format": 1}, Distributed(world_size=4), "runs/x")  # checkpoints from before torchrun
    check_resume_world(two, Distributed(world_size=2, rank=1), "runs/x")


def test_an_unavailable_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrainingError, match="'nccl', which needs CUDA devices"):
        choose_backend("nccl", torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(TrainingError, match="backend 'gloo' is not available in this PyTorch build"):
        choose_backend("auto", torch.device("cpu"))


def test_the_torchrun_environment_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    with pytest.raises(TrainingError, match="inconsistent torchrun environment"):
        launched_world()


def test_the_distributed_section_is_validated() -> None:
    config = experiment()
    config["trainer"]["distributed"] = {"mode": "model_parallel", "sync_bn": True}
    with pytest.raises(ConfigError) as error:
        load_experiment(config)
    paths = {issue.path for issue in error.value.issues}
    assert {"trainer.distributed.mode", "trainer.distributed.sync_bn"} <= paths


# -- real torchrun launches ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(*args: str, nproc: int = 2, script: Path | None = None) -> list[str]:
    target = [str(script)] if script is not None else ["-m", "ibcore.cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *target,
        *args,
    ]


def launch_env(**extra: str) -> dict[str, str]:
    """No inherited IB_* switches; one thread per process (torchrun's default, and the reference's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IB_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_dir_in(parent: Path) -> Path:
    (run_dir,) = parent.iterdir()
    return run_dir


def checkpointed_epochs(run_dir: Path) -> list[int]:
    try:
        return [e["epoch"] for e in json.loads((run_dir / "checkpoints" / "checkpoints.json").read_text())]
    except (OSError, ValueError):
        return []


def final_models(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    (newest,) = sorted((run_dir / "checkpoints").glob("epoch-*.pt"))[-1:]
    return {name: run["model"] for name, run in load_checkpoint(newest)["runs"].items()}


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def assert_close_models(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]], rtol: float
) -> None:
    assert a.keys() == b.keys()
    for run in a:
        assert a[run].keys() == b[run].keys()
        for key, value in a[run].items():
            if value.is_floating_point():
                scale = b[run][key].abs().max().item() + 1e-6
                assert (value - b[run][key]).abs().max().item() <= rtol * scale, (run, key)
            else:
                assert torch.equal(value, b[run][key]), (run, key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """An uninterrupted data_parallel run of ``experiment()`` with two processes, ranks dumping their indices."""
    root = tmp_path_factory.mktemp("two_process")
    config = root / "exp.yaml"
    config.write_text(json.dumps(experiment()))
    started = time.monotonic()
    done = subprocess.run(
        torchrun("run", str(config), "--quiet", "--out", str(root / "out")),
        cwd=root,
        env=launch_env(IB_DUMP_INDICES=str(root / "indices")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"two-process run: {time.monotonic() - started:.1f}s")
    yield run_dir_in(root / "out"), root


@pytest.mark.slow
def test_two_processes_write_one_run_directory(two_process_run: tuple[Path, Path]) -> None:
    run_dir, root = two_process_run
    assert [p.name for p in (root / "out").iterdir()] == [run_dir.name]  # rank 0 made it, rank 1 was told its path
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "results.json", "results.md", "train.log"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "mode": "data_parallel", "backend": "gloo"}
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 5/5:") == 1  # one writer
    assert "global batch 128 = 64 per process" in log and "fused path: off under data_parallel" in log
    lines = metric_lines(run_dir)
    assert len(lines) == len({(line["split"], line["run"], line["epoch"]) for line in lines}) == 5 * 2 * 2
    assert not list(run_dir.glob("**/*.tmp"))


@pytest.mark.slow
def test_each_epoch_the_ranks_take_disjoint_slices_of_the_samplers_stream(
    two_process_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, root = two_process_run
    # The reference streams come from a single-process trainer's samplers.
    reference = Trainer(load_experiment(experiment()), tmp_path, quiet=True)
    assert len(reference.data[reference.seed].train) % 2 == 0  # so no index is repeated to even out the slices
    for epoch in range(5):
        dumped = [
            {
                entry["sampler"]: np.array(entry["indices"])
                for entry in map(json.loads, (root / "indices" / f"indices-rank{rank}-epoch{epoch}.jsonl").open())
            }
            for rank in range(2)
        ]
        assert dumped[0].keys() == dumped[1].keys() and len(dumped[0]) == 2  # instance and class_balanced
        for key in dumped[0]:
            spec = ComponentSpec(**json.loads(key))
            sampler = ibcore.build("sampler", spec.name, spec.params, context=reference.runs[0].context)
            stream = sampler.indices(epoch)
            assert dumped[0][key].tolist() == stream[0::2].tolist()
            assert dumped[1][key].tolist() == stream[1::2].tolist()
            union = np.sort(np.concatenate([dumped[0][key], dumped[1][key]]))
            assert union.tolist() == np.sort(stream).tolist()  # together: exactly the stream, each position once


@pytest.mark.slow
def test_two_processes_reach_the_single_process_numbers(two_process_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = two_process_run
    single = ibcore.run(experiment(), out_dir=tmp_path, quiet=True)
    # In float32, DDP sums gradients in another order and 65 SGD steps with momentum amplify the
    # rounding: the runs drift apart about as much as one single-process run does from itself with
    # another thread count (measured: nll 1-3%, a few test images after 5 epochs). So the float32
    # check is loose and the exact check is in float64, below.
    got, expected = metric_lines(run_dir), metric_lines(single.run_dir)
    assert [(g["split"], g["run"], g["epoch"]) for g in got] == [(e["split"], e["run"], e["epoch"]) for e in expected]
    for g, e in zip(got, expected, strict=True):
        first_epoch = g["epoch"] == 1  # epochs completed
        if g["split"] == "train":
            assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3 if first_epoch else 1e-2)
        else:
            assert g["nll"] == pytest.approx(e["nll"], rel=1e-3 if first_epoch else 5e-2)
            assert abs(g["acc1"] - e["acc1"]) <= (0.5 if first_epoch else 3.0)  # 1 or 6 of 200 images


LAUNCHER_FLOAT64 = """
import sys
import torch
torch.set_default_dtype(torch.float64)  # the models, augmentation and losses then compute in float64
from ibcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_in_float64_two_processes_match_one_process_to_rounding(tmp_path: Path) -> None:
    # Same global batch, global-batch BatchNorm statistics and per-sample augmentation: the two runs
    # compute the same function, so in float64 they agree to rounding error after 2 epochs (26 steps).
    # With classifier re-training (cRT, whose new classifier is drawn at the stage start) and LWS from epoch 1.
    balanced = {"name": "class_balanced"}
    runs = [
        {"name": "ce"},
        {"name": "balanced", "sampler": balanced},
        {"name": "crt", "stages": [{"from_epoch": 1, "retrain_classifier": True, "sampler": balanced}]},
        {"name": "lws", "stages": [{"from_epoch": 1, "scale_classifier": True, "sampler": balanced}]},
    ]
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(experiment(epochs=2, runs=runs)))
    launcher = tmp_path / "float64_ib.py"
    launcher.write_text(LAUNCHER_FLOAT64)
    done = subprocess.run(
        torchrun("run", str(config), "--quiet", "--out", str(tmp_path / "two"), script=launcher),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = ibcore.run(experiment(epochs=2, runs=runs), out_dir=tmp_path / "one", quiet=True)
    finally:
        torch.set_default_dtype(previous)
    two = run_dir_in(tmp_path / "two")
    assert_close_models(final_models(two), final_models(single.run_dir), rtol=1e-9)
    for got, expected in zip(metric_lines(two), metric_lines(single.run_dir), strict=True):
        assert got.keys() == expected.keys()
        for key, value in got.items():
            assert value == (
                pytest.approx(expected[key], rel=1e-9, abs=1e-9) if isinstance(value, float) else expected[key]
            ), key


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (torchrun starts each worker in a session of its own,
    so killing torchrun's process group would leave the workers running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a launch as a crash would: first stop every process of it, then kill them all."""
    tree = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    for member in tree[1:]:  # the workers are not our children: wait until they are gone
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.02)


def kill_after_checkpoint(command: list[str], out: Path, cwd: Path, epoch: int) -> Path:
    """Start ``command`` (a torchrun launch); SIGKILL torchrun and its workers once ``epoch`` is checkpointed."""
    process = subprocess.Popen(command, cwd=cwd, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    run_dir = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            dirs = list(out.glob("exp-*")) if out.exists() else []
            if dirs and max(checkpointed_epochs(dirs[0]), default=0) >= epoch:
                run_dir = dirs[0]
                break
            time.sleep(0.02)
    finally:
        kill_tree(process.pid)
        process.wait()
    assert run_dir is not None, "the run never reached the checkpoint"
    assert max(checkpointed_epochs(run_dir)) < 5, "the run finished before it could be killed"
    assert not (run_dir / "results.json").exists()
    return run_dir


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's workers in /proc")


@pytest.mark.slow
@needs_proc
def test_a_killed_two_process_run_resumes_under_torchrun_to_the_same_numbers(
    two_process_run: tuple[Path, Path], tmp_path: Path
) -> None:
    expected_dir, _ = two_process_run
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(experiment()))
    run_dir = kill_after_checkpoint(
        torchrun("run", str(config), "--quiet", "--out", str(tmp_path / "out")), tmp_path / "out", tmp_path, epoch=2
    )
    resumed = subprocess.run(
        torchrun("resume", str(run_dir), "--quiet"),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed after epoch" in (run_dir / "train.log").read_text()
    expected = json.loads((expected_dir / "results.json").read_text())["last"]
    assert json.loads((run_dir / "results.json").read_text())["last"] == expected  # bit for bit
    assert metric_lines(run_dir) == metric_lines(expected_dir)  # no duplicated or missing lines
    assert_close_models(final_models(run_dir), final_models(expected_dir), rtol=0.0)


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_fails_clearly(
    two_process_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, _ = two_process_run
    before = (run_dir / "metrics.jsonl").read_text()
    one = subprocess.run(
        [sys.executable, "-m", "ibcore.cli", "resume", str(run_dir), "--quiet"],
        cwd=tmp_path,
        env=launch_env(COLUMNS="400"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 1
    assert "written by 2 processes in data_parallel mode, but this resume runs 1 process" in one.stderr
    assert "torchrun --nproc_per_node=2 -m ibcore.cli resume" in one.stderr and "Traceback" not in one.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing was touched

    # The other way round: a single-process run resumed by two processes.
    single = ibcore.run(experiment(epochs=1), out_dir=tmp_path / "single", quiet=True)
    two = subprocess.run(
        torchrun("resume", str(single.run_dir), "--quiet"),
        cwd=tmp_path,
        env=launch_env(COLUMNS="400"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert two.returncode == 1
    assert "written by 1 process, but this resume runs 2 processes in data_parallel mode" in two.stderr


@pytest.mark.slow
@needs_proc
def test_runs_parallel_trains_each_run_as_one_process_would_and_resumes(tmp_path: Path) -> None:
    # Three runs over two ranks: rank 0 trains ce and balanced, rank 1 trains focal, each on the full
    # batch stream; rank 0 gathers their states into each checkpoint. Killed and resumed, the run
    # still ends with the single-process numbers.
    runs = [
        {"name": "ce"},
        {"name": "focal", "loss": {"name": "focal", "params": {"gamma": 1.0}}},
        {"name": "balanced", "sampler": {"name": "class_balanced"}},
    ]
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(experiment(mode="runs_parallel", runs=runs)))
    run_dir = kill_after_checkpoint(
        torchrun("run", str(config), "--quiet", "--out", str(tmp_path / "out")), tmp_path / "out", tmp_path, epoch=2
    )
    resumed = subprocess.run(
        torchrun("resume", str(run_dir), "--quiet"),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = (run_dir / "train.log").read_text()
    assert "rank 0 trains: ce, balanced" in log and "rank 1 trains: focal" in log

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        single = ibcore.run(experiment(mode="runs_parallel", runs=runs), out_dir=tmp_path / "one", quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert (
        json.loads((run_dir / "results.json").read_text())["last"]
        == json.loads((single.run_dir / "results.json").read_text())["last"]
    )
    assert metric_lines(run_dir) == metric_lines(single.run_dir)
    assert_close_models(final_models(run_dir), final_models(single.run_dir), rtol=0.0)
