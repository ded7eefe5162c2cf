"""The fused path for every built-in run: mixers replayed from a (stand-in) CUDA graph, Adam and AdamW, cRT and LWS.

Each case trains the same experiment fused and sequentially in float64 on the CPU and asserts the models (and
the optimizer state a checkpoint saves) agree to 1e-9 after several steps, stages included. The graph path
runs through ``ReplayByRunning``: the engine's control flow of CUDA graphs (warm-up step, capture, replays with
new inputs and new plans, the last smaller batch kernel by kernel), with each replay running the captured step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import ReplayByRunning, assert_same_state, make_trainer, state_of, tiny_config

from ibcore.config import load_experiment
from ibcore.engine.checkpoint import load_checkpoint, load_latest
from ibcore.engine.trainer import Trainer

SGD = {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}}


def config_with(runs: list[dict[str, Any]], epochs: int = 3) -> dict[str, Any]:
    config = tiny_config(epochs=epochs, channels_last=False)
    config["data"]["batch_size"] = 256  # 5 steps an epoch, the last one smaller (kernel by kernel, not replayed)
    config["runs"] = runs
    config["evaluators"] = [{"name": "accuracy"}]
    return config


def train_both(
    config: dict[str, Any], tmp_path: Path, graphs: bool = True, flat: bool = True
) -> tuple[Trainer, Trainer, str]:
    """The experiment trained fused (through the graph stand-in with ``graphs``; with the flat update, as on a
    GPU, with ``flat``) and sequentially; and the fused trainer's log."""
    ReplayByRunning.captured = 0
    options = {"graph_runner": ReplayByRunning} if graphs else {}
    fused = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "fused", **options)
    assert fused.fused_step is not None
    fused.fused_step.flat_updates = flat
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "sequential")
    fused.fit()
    sequential.fit()
    return fused, sequential, (fused.run_dir / "train.log").read_text()


def assert_runs_agree(fused: Trainer, sequential: Trainer) -> None:
    for run in sequential.runs:
        assert run.failed is None, run.failed
        assert_same_state(state_of(fused, run.name), state_of(sequential, run.name), atol=1e-9)
        mine = next(r for r in fused.runs if r.name == run.name).optimizer
        assert mine is not None and run.optimizer is not None
        assert_same_optimizer_state(mine.state_dict(), run.optimizer.state_dict(), run.name)


def assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any], run: str) -> None:
    """What a checkpoint saves of the optimizer: the same keys, and values equal to 1e-9 (step counts exactly)."""
    assert a["state"].keys() == b["state"].keys(), run
    for index, state in b["state"].items():
        for key, value in state.items():
            if value is None:  # SGD without momentum keeps no buffer
                continue
            mine = a["state"][index][key]
            message = f"{run}: state of parameter {index}, {key}"
            torch.testing.assert_close(mine.double(), value.double(), atol=1e-9, rtol=1e-9, msg=message)
            if key == "step":
                assert mine.dtype == value.dtype and mine.device == value.device, message
    as_lists = lambda group: {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}  # noqa: E731
    for mine, theirs in zip(a["param_groups"], b["param_groups"], strict=True):
        assert as_lists(mine) == as_lists(theirs), run  # a checkpoint turns Adam's betas tuple into a list


def test_mixing_runs_are_stacked_and_replayed_like_the_sequential_steps(tmp_path: Path, float64: None) -> None:
    """mixup (on half the batches), CutMix, Remix and input-level manifold mixup replay one captured step with a
    new plan every step; a plain run shares their group; a mixer switched off for the last epoch re-captures."""
    config = config_with(
        [
            {"name": "ce"},
            {"name": "mixup", "mixer": {"name": "input_mixup", "params": {"alpha": 1.0, "prob": 0.5}}},
            {"name": "cutmix", "mixer": {"name": "cutmix", "params": {"alpha": 1.0, "disable_last_epochs": 1}}},
            {"name": "remix", "mixer": {"name": "remix", "params": {"alpha": 1.0, "kappa": 1.5, "tau": 0.5}}},
            {"name": "manifold", "mixer": {"name": "manifold_mixup", "params": {"layers": [0]}}},
        ]
    )
    config["defaults"]["optimizer"] = SGD
    fused, sequential, log = train_both(config, tmp_path)
    assert "5 runs stacked (ce, mixup, cutmix, remix, manifold)" in log
    assert "CUDA graphs: the training step of ce, mixup, cutmix, remix, manifold is captured" in log
    assert "kernel by kernel" not in log and "trains on its own" not in log
    step = fused.fused_step
    assert step is not None
    # epochs 1-2 share one group and one capture; cutmix stops mixing in epoch 3: a new group, a new capture
    assert step.groups_built == 2 and ReplayByRunning.captured == 2
    # 5 steps an epoch, the last one smaller (kernel by kernel): epoch 1 warms up, then captures and replays 3;
    # epoch 2 replays 4 with the same graph; epoch 3 (a new group) warms up and replays 3
    assert step.graph_replays == 3 + 4 + 3
    assert_runs_agree(fused, sequential)


def test_a_mixer_with_its_own_mix_is_stacked_but_not_replayed(tmp_path: Path, float64: None) -> None:
    """A plugin mixer that does not declare ``standard_mix`` keeps its own ``mix``: fused kernel by kernel."""
    import ibcore
    from ib_plugins_builtin.mixers._impl import InputMixup

    class Flipping(InputMixup):
        standard_mix = False

        def mix(self, x: torch.Tensor, plan: Any) -> torch.Tensor:
            return super().mix(x.flip(-1), plan)

    config = config_with(
        [{"name": "ce"}, {"name": "ce2", "loss": {"name": "focal"}}, {"name": "own", "mixer": {"name": "flipping"}}],
        epochs=2,
    )
    with ibcore.registry_snapshot():
        ibcore.register_mixer("flipping")(lambda params, context: Flipping(alpha=1.0))
        fused, sequential, log = train_both(config, tmp_path)
    assert "CUDA graphs: run 'own' steps kernel by kernel: its mixer does not declare standard_mix = True" in log
    assert "CUDA graphs: the training step of ce, ce2 is captured" in log
    assert_runs_agree(fused, sequential)


@pytest.mark.parametrize(("graphs", "flat"), [(True, True), (False, False)])
def test_adam_and_adamw_runs_are_stacked_with_their_own_hyperparameters(
    tmp_path: Path, float64: None, graphs: bool, flat: bool
) -> None:
    """Adam (L2) and AdamW (decoupled) in one group, each with its own lr, betas, eps and weight decay, a
    per-iteration warm-up, biases without weight decay, and a stage that starts a fresh AdamW; SGD runs in a
    group of their own. Step counts and both moments are handed back as torch.optim keeps them."""
    adam = {"lr": 2e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-3, "warmup_epochs": 1}
    adamw = {"lr": 1e-3, "weight_decay": 5e-2, "no_weight_decay_on_bias_and_norm": True}
    config = config_with(
        [
            {"name": "adam", "optimizer": {"name": "adam", "params": {**adam, "warmup_per_iteration": True}}},
            {"name": "adamw", "optimizer": {"name": "adamw", "params": adamw}},
            {
                "name": "restart",
                "optimizer": {"name": "adam", "params": {"lr": 3e-3}},
                "stages": [{"from_epoch": 2, "optimizer": {"name": "adamw", "params": {"lr": 5e-4}}}],
            },
            {"name": "sgd_a", "optimizer": SGD},
            {"name": "sgd_b", "optimizer": SGD, "loss": {"name": "focal"}},
        ]
    )
    fused, sequential, log = train_both(config, tmp_path, graphs=graphs, flat=flat)
    assert "3 runs stacked (adam, adamw, restart)" in log and "2 runs stacked (sgd_a, sgd_b)" in log
    assert "trains on its own" not in log
    assert fused.fused_step is not None
    if graphs:
        assert fused.fused_step.graph_replays > 0
    # with flat updates (a GPU's default), after each group's first step gradients go to one flat buffer and the
    # update runs over all of it; otherwise (a CPU's default) it stays parameter by parameter
    assert all(group.optimizer.flat == flat for group in fused.fused_step.kept)
    assert_runs_agree(fused, sequential)


def test_a_parameter_without_a_gradient_keeps_the_update_parameter_by_parameter(tmp_path: Path, float64: None) -> None:
    """torch.optim skips a parameter that got no gradient (no weight decay, no momentum); the flat update would
    not, so a group whose first step leaves one without a gradient keeps updating parameter by parameter."""
    import ibcore

    def with_spare(params: Any, context: Any) -> torch.nn.Module:
        model = ibcore.build("backbone", "small_cnn", {}, context=context)
        model.register_parameter("spare", torch.nn.Parameter(torch.ones(3)))  # never used in forward
        return model

    config = config_with([{"name": "ce"}, {"name": "focal", "loss": {"name": "focal"}}], epochs=2)
    config["defaults"]["backbone"] = {"name": "with_spare"}
    config["defaults"]["optimizer"] = SGD
    with ibcore.registry_snapshot():
        ibcore.register_backbone("with_spare")(with_spare)
        fused, sequential, log = train_both(config, tmp_path, graphs=False)
    assert "2 runs stacked (ce, focal)" in log
    assert fused.fused_step is not None and not any(g.optimizer.flat for g in fused.fused_step.kept)
    for run in fused.runs:
        assert torch.equal(run.model.get_parameter("spare"), torch.ones(3))
    assert_runs_agree(fused, sequential)


def test_crt_and_lws_stages_are_stacked_with_the_backbone_frozen(tmp_path: Path, float64: None) -> None:
    """cRT (classifier re-initialised and trained), LWS (a per-class scale) and LWS with BatchNorm statistics
    re-estimated (MiSLAS) are each stacked with a partner after their stage starts; the frozen backbone and its
    BatchNorm statistics do not move, and every run ends as the sequential path ends it."""
    balanced = {"name": "class_balanced"}
    crt = {"from_epoch": 1, "retrain_classifier": True, "sampler": balanced, "optimizer": SGD}
    lws = {"from_epoch": 1, "scale_classifier": True, "sampler": balanced, "optimizer": SGD}
    mislas = {**lws, "train_classifier": True, "batchnorm": "update"}
    config = config_with(
        [
            {"name": "crt", "stages": [crt]},
            {"name": "crt_focal", "loss": {"name": "focal"}, "stages": [crt]},
            {"name": "lws", "stages": [lws]},
            {"name": "lws_ldam", "loss": {"name": "ldam", "params": {"s": 1.0}}, "stages": [lws]},
            {"name": "mislas", "stages": [mislas]},
            {"name": "mislas_focal", "loss": {"name": "focal"}, "stages": [mislas]},
        ]
    )
    config["defaults"]["optimizer"] = SGD
    config["trainer"]["keep_checkpoints"] = 3
    fused, sequential, log = train_both(config, tmp_path)
    assert "2 runs stacked (crt, crt_focal)" in log and "2 runs stacked (lws, lws_ldam)" in log, log
    assert "2 runs stacked (mislas, mislas_focal)" in log
    assert "trains on its own" not in log
    first = load_checkpoint(fused.run_dir / "checkpoints" / "epoch-0001.pt")["runs"]
    for name in ("crt", "lws", "mislas"):
        before, after = first[name]["model"], state_of(fused, name)
        moved = {key for key in before if not torch.equal(before[key], after[key])}
        expected = {
            "crt": {"classifier.weight", "classifier.bias"},
            "lws": set(),  # the scale is new, everything else stays
            "mislas": {"classifier.weight", "classifier.bias"},  # + BatchNorm statistics, re-estimated
        }[name]
        batchnorm = {key for key in moved if "running_" in key or "num_batches_tracked" in key}
        assert moved - batchnorm == expected, name
        assert bool(batchnorm) == (name == "mislas"), name
    assert_runs_agree(fused, sequential)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["mixers", "adam", "frozen"])
def test_real_cuda_graphs_replay_the_newly_fused_runs_like_kernel_by_kernel_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """On a GPU: the same experiments with real CUDA graphs against the CPU stand-in's control flow (each
    "replay" launches the step anew); fp32 without TF32, so the two stay close (cuDNN may pick other kernels)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    crt = {"from_epoch": 1, "retrain_classifier": True, "sampler": {"name": "class_balanced"}}
    runs = {
        "mixers": [
            {"name": "ce"},
            {"name": "mixup", "mixer": {"name": "input_mixup", "params": {"prob": 0.5}}},
            {"name": "cutmix", "mixer": {"name": "cutmix"}},
            {"name": "remix", "mixer": {"name": "remix"}},
        ],
        "adam": [
            {"name": "adam", "optimizer": {"name": "adam", "params": {"lr": 2e-3, "weight_decay": 1e-3}}},
            {"name": "adamw", "optimizer": {"name": "adamw", "params": {"lr": 1e-3}}},
        ],
        "frozen": [
            {"name": "crt", "stages": [crt]},
            {"name": "crt_focal", "loss": {"name": "focal"}, "stages": [crt]},
        ],
    }[case]
    config = config_with(runs)
    config["defaults"]["optimizer"] = SGD
    config["trainer"].update(device="cuda", fused="on")
    graphed = make_trainer(config, tmp_path, "graphed")
    graphed.fit()
    log = (graphed.run_dir / "train.log").read_text()
    assert "cannot be captured" not in log and "one after another" not in log and "trains on its own" not in log, log
    assert graphed.fused_step is not None and graphed.fused_step.graph_replays > 0
    eager = make_trainer(config, tmp_path, "eager", graph_runner=ReplayByRunning)
    eager.fit()
    for run in graphed.runs:
        a, b = state_of(graphed, run.name), state_of(eager, run.name)
        for key in a:
            if a[key].is_floating_point():
                torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=1e-3, msg=f"{run.name}: {key}")


def test_a_resumed_fused_experiment_ends_where_the_uninterrupted_one_ends(tmp_path: Path) -> None:
    """Adam's step counts and moments, and the mixers' draws, survive a checkpoint: stopped after epoch 2 and
    resumed, the fused runs (graph path, float32) end bit for bit where three uninterrupted epochs end."""
    config = config_with(
        [
            {"name": "adam", "optimizer": {"name": "adam", "params": {"lr": 2e-3}}},
            {"name": "adamw", "optimizer": {"name": "adamw", "params": {"lr": 1e-3}}},
            {"name": "mixup", "optimizer": {"name": "adam", "params": {"lr": 1e-3}}, "mixer": {"name": "input_mixup"}},
            {"name": "cutmix", "optimizer": SGD, "mixer": {"name": "cutmix"}},
            {"name": "ce", "optimizer": SGD},
        ]
    )
    config["trainer"]["fused"] = "on"
    full = make_trainer(config, tmp_path, "full", graph_runner=ReplayByRunning)
    partial = make_trainer(config, tmp_path, "partial", graph_runner=ReplayByRunning)
    partial.epochs = 2  # stopped, as if killed after the checkpoint of epoch 2
    resumed = Trainer(load_experiment(config), partial.run_dir, quiet=True, graph_runner=ReplayByRunning)
    for trainer in (full, partial, resumed):
        assert trainer.fused_step is not None
        trainer.fused_step.flat_updates = True  # as on a GPU
    full.fit()
    partial.fit()
    resumed.restore(load_latest(partial.run_dir / "checkpoints"))
    resumed.fit()
    log = (resumed.run_dir / "train.log").read_text()
    assert "3 runs stacked (adam, adamw, mixup)" in log and "2 runs stacked (cutmix, ce)" in log
    for run in full.runs:
        assert_same_state(state_of(resumed, run.name), state_of(full, run.name))
        mine = next(r for r in resumed.runs if r.name == run.name).optimizer
        assert mine is not None and run.optimizer is not None
        assert_same_optimizer_state(mine.state_dict(), run.optimizer.state_dict(), run.name)
