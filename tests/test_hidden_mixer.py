"""A plugin mixer that mixes hidden activations trains identically on the fused and the sequential path.

The fused path used to mix every stacked run at the input and to rely on a ``mixes_hidden`` attribute the
``Mixer`` protocol does not have: a third-party mixer that mixes a hidden layer without that attribute was mixed
at the input on the fused path only, a silent wrong result. The plan's ``layer`` is what decides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from test_engine import assert_same_state, make_trainer, state_of, tiny_config

import ibcore

HIDDEN_MIXER = """
import torch
from ibcore import MixPlan, register_mixer

class HiddenMix:
    def active(self, epoch):
        return True

    def plan(self, x, targets, generator):
        n = len(targets)
        permutation = torch.randperm(n, generator=generator)
        lam = float(torch.rand((), generator=generator)) * 0.5 + 0.25
        return MixPlan(permutation=permutation, lam=lam, target_weight=torch.full((n,), lam), layer=1)

    def mix(self, h, plan):
        return plan.lam * h + (1 - plan.lam) * h[plan.permutation]

@register_mixer("ibtest_hidden_mix")
def build(params, context):
    return HiddenMix()
"""


def test_a_mixer_that_mixes_a_hidden_layer_trains_alike_on_both_paths(tmp_path: Path, float64: None) -> None:
    (tmp_path / "hidden_mix.py").write_text(HIDDEN_MIXER, encoding="utf-8")
    config: dict[str, Any] = tiny_config(epochs=2, channels_last=False)
    config["plugins"] = ["hidden_mix"]
    config["runs"] = [
        {"name": "ce"},
        {"name": "focal", "loss": {"name": "focal", "params": {"gamma": 1.0}}},
        {"name": "hidden", "mixer": {"name": "ibtest_hidden_mix"}},
    ]
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    with ibcore.registry_snapshot():
        import sys

        sys.path.insert(0, str(tmp_path))
        try:
            loaded = json.loads(path.read_text())
            fused = make_trainer({**loaded, "trainer": {**loaded["trainer"], "fused": "on"}}, tmp_path, "fused")
            sequential = make_trainer({**loaded, "trainer": {**loaded["trainer"], "fused": "off"}}, tmp_path, "seq")
            fused.fit()
            sequential.fit()
        finally:
            sys.path.remove(str(tmp_path))
    for run in ("ce", "focal", "hidden"):
        assert_same_state(state_of(fused, run), state_of(sequential, run), atol=1e-9)
    log = (fused.run_dir / "train.log").read_text()
    assert "run 'hidden' mixes hidden activations" in log
    assert not torch.equal(state_of(fused, "hidden")["classifier.weight"], state_of(fused, "ce")["classifier.weight"])
