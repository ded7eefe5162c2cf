"""How many runs one fused step stacks: the memory estimate, the split into groups that fit, the refusal of an
explicit ``trainer.fused_max_runs`` that does not fit (with the number that does), before anything trains."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import assert_same_state, make_trainer, state_of, tiny_config

from ibcore.engine.memory import HEADROOM, StepMemory, measure_step, saved_bytes
from ibcore.errors import TrainingError


def test_a_step_is_measured_by_the_tensors_autograd_saves() -> None:
    """Linear(8→16), ReLU, Linear(16→4): per sample autograd keeps the first layer's input (8 floats) and the ReLU
    output (16 floats, which the second layer saves too: counted once); the run's copy of the input adds 8 floats.
    The weights are saved at every batch size and cancel. SGD keeps one buffer per parameter: parameters count
    three times (stacked copy, gradient, momentum)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    memory = measure_step(model, torch.randn(8), optimizer_slots=1, autocast=contextlib.nullcontext)
    assert memory.per_sample == (8 + 16 + 8) * 4
    parameters = 8 * 16 + 16 + 16 * 4 + 4
    assert memory.per_run == parameters * 4 * 3
    assert memory.group(5, 100) == 5 * (int(100 * memory.per_sample * HEADROOM) + memory.per_run)
    # Saved bytes grow with the batch exactly as measured
    batch = torch.randn(64, 8)
    half = batch[:32].clone()  # a view would count the whole batch's storage
    no_autocast = contextlib.nullcontext
    assert saved_bytes(model, batch, no_autocast) - saved_bytes(model, half, no_autocast) == 32 * (8 + 16) * 4


def test_measuring_leaves_the_run_untouched() -> None:
    """The probe runs on a copy: a training-mode BatchNorm's running statistics do not move."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory = measure_step(model, torch.randn(3, 8, 8), optimizer_slots=2, autocast=contextlib.nullcontext)
    assert memory.per_sample > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_most_runs_is_the_largest_k_whose_estimate_fits() -> None:
    memory = StepMemory(per_sample=1000, per_run=50_000)
    one = memory.group(1, 128)
    assert memory.most_runs(128, 3 * one) == 3 and memory.most_runs(128, 3 * one - 1) == 2
    assert memory.most_runs(128, one - 1) == 0


def four_runs() -> dict[str, Any]:
    config = tiny_config(epochs=2, channels_last=False)
    config["data"]["batch_size"] = 256
    config["runs"] = [
        {"name": "ce"},
        {"name": "focal", "loss": {"name": "focal", "params": {"gamma": 1.0}}},
        {"name": "bs", "loss": {"name": "balanced_softmax"}},
        {"name": "ldam", "loss": {"name": "ldam", "params": {"s": 1.0}}},
    ]
    config["evaluators"] = [{"name": "accuracy"}]
    return config


def budget_for(runs: int, config: dict[str, Any], tmp_path: Path) -> int:
    """Bytes in which exactly ``runs`` runs of ``config`` fit, by the engine's own estimate."""
    probe = make_trainer(config, tmp_path, "probe")
    model = probe.runs[0].model
    memory = measure_step(model, torch.zeros(1, 28, 28), optimizer_slots=1, autocast=contextlib.nullcontext)
    return memory.group(runs, config["data"]["batch_size"])


def test_runs_that_do_not_fit_in_one_group_are_split_into_groups_that_do(tmp_path: Path, float64: None) -> None:
    config = four_runs()
    on = {**config, "trainer": {**config["trainer"], "fused": "on"}}
    budget = budget_for(2, on, tmp_path)
    fused = make_trainer(on, tmp_path, "fused")
    assert fused.fused_step is not None
    fused.fused_step.memory_budget = lambda device: budget
    fused.fit()
    log = (fused.run_dir / "train.log").read_text()
    assert "fused path: one stacked step of 4 runs (ce, focal, bs, ldam) would need" in log
    assert "fused path: 4 runs stacked as 2 groups of at most 2 runs, one after another" in log
    assert [len(g.runs) for g in fused.fused_step.groups + fused.fused_step.kept] == [2, 2]
    assert fused.fused_step.groups_built == 3  # the group of 4 (measured, never stepped), then its two halves
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
    sequential.fit()
    for run in ("ce", "focal", "bs", "ldam"):
        assert_same_state(state_of(fused, run), state_of(sequential, run), atol=1e-9)


def test_fused_max_runs_splits_the_runs_on_any_device(tmp_path: Path) -> None:
    config = four_runs()
    config["trainer"].update(fused="on", fused_max_runs=3, epochs=1)
    trainer = make_trainer(config, tmp_path)
    trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "fused path: 4 runs stacked as 2 groups of at most 2 runs, one after another" in log  # 2 + 2, not 3 + 1


def test_an_explicit_fused_max_runs_that_does_not_fit_is_refused_with_one_that_does(tmp_path: Path) -> None:
    config = four_runs()
    config["trainer"].update(fused="on", fused_max_runs=4)
    budget = budget_for(3, config, tmp_path)
    trainer = make_trainer(config, tmp_path, "refused")
    assert trainer.fused_step is not None
    trainer.fused_step.memory_budget = lambda device: budget
    before = {run.name: state_of(trainer, run.name) for run in trainer.runs}
    with pytest.raises(TrainingError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "trainer.fused_max_runs: 4: one stacked step of 4 runs (ce, focal, bs, ldam)" in message
    assert "at most 3 fit. Set trainer.fused_max_runs: 3" in message
    for run in trainer.runs:  # refused before the first step: nothing trained
        assert_same_state(state_of(trainer, run.name), before[run.name])
    assert not list((trainer.run_dir / "checkpoints").glob("*.pt"))
