"""A component kind is one declaration: registry, decorator, entry-point group, protocol check, ``ib list``,
JSON Schema and the config walk all follow from it. And the training step is such a kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from test_engine import make_trainer, state_of, tiny_config

import ibcore
from ibcore.config.schema import ComponentSpec
from ibcore.config.walk import component_specs
from ibcore.errors import ProtocolError, RegistryError
from ibcore.kinds import Kind, get_kind, kind_names


class Probe(Protocol):
    """What a probe built by a test's new kind must offer."""

    depth: int

    def measure(self, x: float) -> float: ...


class ProbeSpec(ComponentSpec):
    """A registered probe."""

    component_kind = "probe"


class WithProbes(ibcore.config.schema._Strict):
    probes: list[ProbeSpec] = []
    main: ProbeSpec | None = None


def test_a_new_kind_is_one_declaration() -> None:
    with ibcore.registry_snapshot():
        probe = ibcore.declare_kind(Kind("probe", Probe))
        assert "probe" in kind_names() and get_kind("probes") is probe and probe.entry_point_group == "ibcore.probes"
        assert probe.methods == ("measure",) and probe.attributes == ("depth",)

        class Deep:
            depth = 3

            def measure(self, x: float) -> float:
                return x * self.depth

        @probe.register("deep")
        def build_deep(params: Any, context: Any) -> Deep:
            """A probe three deep."""
            return Deep()

        assert ibcore.build("probe", "deep").measure(2.0) == 6.0
        assert [i.name for i in ibcore.list_components("probes")] == ["deep"]

        @probe.register("shallow")
        def build_shallow(params: Any, context: Any) -> object:
            return object()

        with pytest.raises(ProtocolError, match="does not follow the probe protocol; missing: measure, depth"):
            ibcore.build("probe", "shallow")
        with pytest.raises(RegistryError, match="does not follow the probe protocol; missing: measure"):

            @probe.register("half")
            class Half:  # a class is checked when it is registered
                depth = 1

        # the config walk finds the new kind's fields through its spec class
        found = list(component_specs(WithProbes, {"probes": [{"name": "deep"}], "main": {"name": "x"}}))
        assert [(kind, path) for _, kind, path in found] == [("probe", "probes[0]"), ("probe", "main")]
    assert "probe" not in kind_names()  # the snapshot restores the declarations too
    with pytest.raises(RegistryError, match="Unknown component kind 'probe'"):
        ibcore.list_components("probe")


def test_a_kind_cannot_be_declared_twice_differently() -> None:
    with ibcore.registry_snapshot():
        with pytest.raises(RegistryError, match="already declared"):
            ibcore.declare_kind(Kind("loss", Probe))
        with pytest.raises(RegistryError, match="plural 'losses'"):
            ibcore.declare_kind(Kind("lossy", Probe, plural="losses"))


def test_the_step_kind_is_listed_and_its_params_validated(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-m", "ibcore.cli", "list", "steps"], capture_output=True, text=True)
    assert listed.returncode == 0 and "standard" in listed.stdout, listed.stderr
    config = tiny_config()
    config["runs"][0]["step"] = {"name": "standard", "params": {"rho": 0.05}}
    config["runs"][1]["stages"] = [{"from_epoch": 1, "step": {"name": "standrad"}}]
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == ["runs[0].step.params.rho", "runs[1].stages[0].step.name"]
    assert "Did you mean: standard" in issues[1].message


class HalfStep:
    """A step plugin: the standard step, then every parameter halved towards zero (a stand-in for a post-step
    projection such as weight balancing's MaxNorm). It sees runs only through the StepRun view."""

    def __call__(self, runs: Any, batches: Any) -> dict[str, torch.Tensor]:
        losses = {}
        for run in runs:
            batch = batches[run.name]
            with run.autocast():
                loss = run.loss(run.forward(batch.inputs), batch.targets)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            with torch.no_grad():
                for parameter in run.model.classifier.parameters():
                    parameter.mul_(0.5)
            losses[run.name] = loss.detach()
        return losses


def test_a_run_with_its_own_step_trains_alone_while_the_others_stay_fused(tmp_path: Path, float64: None) -> None:
    config = tiny_config(epochs=1, channels_last=False)
    config["runs"].append({"name": "halved", "step": {"name": "ibtest_half"}})
    with ibcore.registry_snapshot():
        ibcore.register_step("ibtest_half")(lambda params, context: HalfStep())
        fused = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "fused")
        sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
        fused.fit()
        sequential.fit()
    log = (fused.run_dir / "train.log").read_text()
    assert "2 runs stacked (ce, focal)" in log
    assert "fused path: run 'halved' trains on its own (its step 'ibtest_half' is not 'standard')" in log
    assert json.loads((fused.run_dir / "meta.json").read_text())["fused_groups"] == [["ce", "focal"]]
    for run in ("ce", "focal", "halved"):
        a, b = state_of(fused, run), state_of(sequential, run)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-9, rtol=1e-9, msg=f"{run}: {key}")
    # the step's projection happened: the classifier is far smaller than the standard run's
    halved, ce = state_of(fused, "halved")["classifier.weight"], state_of(fused, "ce")["classifier.weight"]
    assert halved.abs().max() < 0.5 * ce.abs().max()
