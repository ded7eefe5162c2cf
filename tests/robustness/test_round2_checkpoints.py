"""Checkpoints with the right checksum but the wrong content (issue 14, round 2).

A checkpoint listed in checkpoints.json with its SHA-256 passes the integrity check; it can still be
crafted, or come from another run (same run names, another width). Each such file must be a
``CheckpointError`` that names it and says what is wrong — never a KeyError, TypeError, ValueError or
RuntimeError traceback from inside ``ib resume``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import TINY_DATA_PLUGIN, base_config, no_traceback, tiny_config, write_module

from ibcore.engine import checkpoint as ckpt
from ibcore.errors import CheckpointError

Cli = Callable[..., Any]


def trainer_state(epoch: int = 2) -> dict[str, Any]:
    """What Trainer.save writes, for one small model (no training needed)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {
        "format": 1,
        "metrics_format": 2,
        "epoch": epoch,
        "distributed": {"world_size": 1, "mode": "data_parallel"},
        "runs": {"ce": {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "failed": None}},
        "history": [{"split": "test", "run": "ce", "epoch": epoch, "acc": 50.0}],
        "best": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": []},
    }


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        target = state
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


CRAFTED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "history missing": (_without("history"), "it has no 'history'"),
    "rng missing": (_without("rng"), "it has no 'rng'"),
    "epoch a string": (_set("epoch", value="two"), "'epoch' must be the number of finished epochs"),
    "epoch negative": (_set("epoch", value=-3), "'epoch' must be the number of finished epochs"),
    "epoch zero": (_set("epoch", value=0), "'epoch' must be the number of finished epochs"),
    "epoch a bool": (_set("epoch", value=True), "'epoch' must be the number of finished epochs"),
    "runs a list": (_set("runs", value=[{"model": {}}]), "'runs' must map run names to their states"),
    "runs empty": (_set("runs", value={}), "'runs' is empty"),
    "run without model": (lambda s: s["runs"]["ce"].pop("model"), "runs['ce'] has no 'model'"),
    "model not a dict": (_set("runs", "ce", "model", value=[1, 2]), "runs['ce']['model'] must be a state dict"),
    "model value not a tensor": (_set("runs", "ce", "model", "weight", value="w"), "['weight'] is not a tensor"),
    "optimizer a string": (_set("runs", "ce", "optimizer", value="sgd"), "runs['ce']['optimizer'] must be a mapping"),
    "optimizer without groups": (
        _set("runs", "ce", "optimizer", value={"state": {}}),
        "is not a torch optimizer state",
    ),
    "failed a number": (_set("runs", "ce", "failed", value=3), "runs['ce']['failed'] must be null or a message"),
    "history a dict": (_set("history", value={"a": 1}), "'history' must be a list of metrics lines"),
    "history line a string": (_set("history", value=["x"]), "history[0] must be a mapping"),
    "history line without epoch": (_set("history", value=[{"split": "test", "run": "ce"}]), "history[0] must have"),
    "best a list": (_set("best", value=[1]), "'best' must be a mapping"),
    "best entry malformed": (_set("best", value={"ce": {"score": "high"}}), "best['ce'] must have a numeric 'score'"),
    "rng a list": (_set("rng", value=[1]), "'rng' must be a mapping of RNG states"),
    "rng state a list": (_set("rng", "torch", value=[1, 2, 3]), "rng['torch'] must be a tensor"),
    "rng state of floats": (_set("rng", "torch", value=torch.zeros(5056)), "rng['torch'] must be a torch.uint8"),
    "rng state too short": (
        _set("rng", "torch", value=torch.zeros(10, dtype=torch.uint8)),
        "of 5056 bytes (torch's CPU generator), got torch.uint8 of shape [10]",
    ),
    "cuda states not tensors": (_set("rng", "cuda", value=["x"]), "rng['cuda'] must be a list of uint8 tensors"),
    "per-rank states for another world": (
        _set("rng", "torch_per_rank", value=[torch.get_rng_state()] * 2),
        "holds 2 states for 1 processes",
    ),
    "distributed a list": (_set("distributed", value=[2]), "'distributed' must hold a world_size"),
    "world size zero": (_set("distributed", value={"world_size": 0, "mode": "x"}), "'distributed' must hold"),
    "metrics_format a string": (_set("metrics_format", value="2"), "'metrics_format' must be a whole number"),
}


def write_listed(directory: Path, state: Any, epoch: int = 2) -> Path:
    """``state`` saved as epoch-NNNN.pt and listed in the manifest with its true checksum."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:04d}.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / ckpt.MANIFEST).write_text(json.dumps([{"file": path.name, "epoch": epoch, "sha256": digest}]))
    return path


def test_a_checkpoint_as_the_trainer_writes_it_loads(tmp_path: Path) -> None:
    write_listed(tmp_path / "checkpoints", trainer_state())
    state = ckpt.load_latest(tmp_path / "checkpoints")
    assert state["epoch"] == 2 and ckpt.loaded_from(state) == str(tmp_path / "checkpoints" / "epoch-0002.pt")
    assert ckpt.structure_problems(trainer_state(), complete=True) == []


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_a_crafted_checkpoint_with_a_valid_checksum_is_a_checkpoint_error(tmp_path: Path, case: str) -> None:
    change, expected = CRAFTED[case]
    state = trainer_state()
    change(state)
    path = write_listed(tmp_path / "checkpoints", state)
    with pytest.raises(CheckpointError) as error:
        ckpt.load_latest(tmp_path / "checkpoints")
    message = str(error.value)
    assert str(path) in message and expected in message, message


def test_the_manifest_and_the_checkpoint_must_agree_on_the_epoch(tmp_path: Path) -> None:
    path = write_listed(tmp_path / "checkpoints", trainer_state(epoch=7), epoch=2)
    with pytest.raises(CheckpointError, match=rf"{path}: holds epoch 7, but checkpoints.json lists it as epoch 2"):
        ckpt.load_latest(tmp_path / "checkpoints")


def test_a_crafted_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 1, trainer_state(epoch=1), keep=3)
    bad = trainer_state(epoch=2)
    bad["history"] = "gone"
    ckpt.save_checkpoint(directory, 2, bad, keep=3)
    with pytest.warns(UserWarning, match=r"skipped bad checkpoints: .*epoch-0002.pt.*'history' must be a list"):
        assert ckpt.load_latest(directory)["epoch"] == 1


def test_a_deeply_nested_manifest_is_no_recursion_error(tmp_path: Path) -> None:
    (tmp_path / ckpt.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        ckpt.load_latest(tmp_path)


def test_an_unreadable_checkpoint_is_skipped_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save_checkpoint(tmp_path, 1, trainer_state(epoch=1), keep=2)
    ckpt.save_checkpoint(tmp_path, 2, trainer_state(epoch=2), keep=2)
    original = Path.open

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "epoch-0002.pt":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.warns(UserWarning, match=r"epoch-0002.pt: cannot be read \(Permission denied\)"):
        assert ckpt.load_latest(tmp_path)["epoch"] == 1


def test_an_old_checkpoint_that_cannot_be_deleted_does_not_stop_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt.save_checkpoint(tmp_path, 1, {"format": 1, "epoch": 1}, keep=1)
    original = Path.unlink

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.name == "epoch-0001.pt":
            raise OSError(30, "Read-only file system", str(self))
        original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.warns(UserWarning, match=r"could not delete the old checkpoint .*epoch-0001.pt"):
        ckpt.save_checkpoint(tmp_path, 2, {"format": 1, "epoch": 2}, keep=1)
    assert ckpt.load_latest(tmp_path)["epoch"] == 2


def test_a_checkpoint_written_by_two_processes_is_accepted(tmp_path: Path) -> None:
    state = trainer_state()
    state["distributed"] = {"world_size": 2, "mode": "data_parallel"}
    state["rng"]["torch_per_rank"] = [torch.get_rng_state(), torch.get_rng_state()]
    write_listed(tmp_path, state)
    assert ckpt.load_latest(tmp_path)["rng"]["torch_per_rank"][1].dtype == torch.uint8


def test_small_states_of_tools_and_tests_still_load(tmp_path: Path) -> None:
    """Without ``runs`` a state is not a training checkpoint: only the keys it has are checked."""
    ckpt.save_checkpoint(tmp_path, 3, {"format": 1, "epoch": 3, "w": torch.ones(2)}, keep=1)
    assert ckpt.load_latest(tmp_path)["epoch"] == 3
    assert "it has no 'history'" in ckpt.structure_problems({"format": 1, "epoch": 3}, complete=True)


@pytest.mark.parametrize("case", ["history missing", "epoch a string", "runs a list", "rng state too short"])
def test_ib_resume_of_a_crafted_checkpoint_is_a_clear_error(ib_cli: Cli, tmp_path: Path, case: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(json.dumps(base_config()), encoding="utf-8")
    state = trainer_state()
    CRAFTED[case][0](state)
    path = write_listed(run_dir / "checkpoints", state)
    result = ib_cli("resume", str(run_dir), "--quiet")
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "no usable checkpoint" in message and str(path) in message and CRAFTED[case][1] in message, message


# --------------------------------------------------------------------------------------------
# What only the trainer can check: a state dict that does not fit, an RNG state torch refuses


def small_cnn(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.BatchNorm2d(width), torch.nn.Flatten())


def test_load_run_state_names_the_run_and_the_first_tensor_that_does_not_fit(tmp_path: Path) -> None:
    model, other = small_cnn(4), small_cnn(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "epoch-0002.pt"
    with pytest.raises(CheckpointError) as error:
        ckpt.load_run_state(model, other.state_dict(), run="ce", path=path)
    message = str(error.value)
    assert f"{path}: run 'ce'" in message
    assert "'0.weight' is [8, 1, 3, 3] in the checkpoint and [4, 1, 3, 3] in the model" in message
    assert "(6 of another shape in all)" in message and "config.yaml" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was half loaded"


def test_load_run_state_reports_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    model = small_cnn(4)
    saved = dict(model.state_dict())
    saved["extra.weight"] = saved.pop("1.running_var")
    with pytest.raises(CheckpointError, match=r"'1.running_var' is missing from the checkpoint"):
        ckpt.load_run_state(model, saved, run="ce", path=tmp_path / "c.pt")
    ckpt.load_run_state(model, small_cnn(4).state_dict(), run="ce", path=tmp_path / "c.pt")  # a fitting one loads


def test_load_optimizer_state_of_another_model_is_a_checkpoint_error(tmp_path: Path) -> None:
    optimizer = torch.optim.SGD(small_cnn(4).parameters(), lr=0.1)
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"run 'ce': the saved optimizer state does not fit"):
        ckpt.load_optimizer_state(optimizer, other.state_dict(), run="ce", path=tmp_path / "c.pt")


@pytest.mark.parametrize(
    "rng_state",
    [torch.zeros(10, dtype=torch.uint8), torch.zeros(5056), [1, 2], None],
    ids=["too short", "float", "list", "none"],
)
def test_restore_rng_refuses_a_bad_state_with_a_checkpoint_error(tmp_path: Path, rng_state: Any) -> None:
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"c\.pt: cannot restore the random number generator"):
        ckpt.restore_rng(rng_state, tmp_path / "c.pt")
    assert torch.equal(torch.get_rng_state(), before)
    ckpt.restore_rng(before, tmp_path / "c.pt")


def test_ib_resume_with_checkpoints_of_another_width_is_a_clear_error(
    ib_cli: Cli, tmp_path: Path, isolated_plugins: None
) -> None:
    write_module(tmp_path, "ibtest_tiny_data", TINY_DATA_PLUGIN)
    config = tiny_config(epochs=2)
    config["defaults"]["backbone"]["params"]["width"] = 8
    path = tmp_path / "wide.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out")).rc == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    # as if the checkpoints of a width-8 run had been copied into a width-4 run with the same run names
    text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    (run_dir / "config.yaml").write_text(text.replace("width: 8", "width: 4"), encoding="utf-8")
    result = ib_cli("resume", str(run_dir), "--quiet")
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "epoch-0002.pt" in message and "run 'ce'" in message and "in the checkpoint and" in message
