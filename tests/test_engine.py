"""The trainer: identical initialisation, shared batches, stages, NaN isolation, checkpoints, files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ibcore
import ibcore.cli
from ibcore.config import load_experiment
from ibcore.engine.checkpoint import load_checkpoint, load_latest, save_checkpoint
from ibcore.engine.steps.fused import CapturedStep
from ibcore.engine.steps.standard import StandardStep
from ibcore.engine.trainer import Trainer
from ibcore.errors import CheckpointError, TrainingError

SGD = {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [3]}}


def tiny_config(**trainer: Any) -> dict[str, Any]:
    """Two epochs of small_cnn on the embedded long-tailed MNIST: seconds on two CPU cores."""
    return {
        "seed": 3,
        "data": {
            "dataset": {"name": "mnist_lt", "params": {"imbalance_ratio": 100, "test_per_class": 20}},
            "batch_size": 128,
        },
        "trainer": {"epochs": 2, "eval_every": 1, "checkpoint_every": 1, "device": "cpu", **trainer},
        "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": SGD, "loss": {"name": "cross_entropy"}},
        "runs": [{"name": "ce"}, {"name": "focal", "loss": {"name": "focal", "params": {"gamma": 1.0}}}],
        "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}],
    }


def make_trainer(config: dict[str, Any], tmp_path: Path, name: str = "run", **options: Any) -> Trainer:
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(load_experiment(config), run_dir, quiet=True, **options)


class RecordingStep(StandardStep):
    """The standard step, recording what each run trains on and with (a step plugin: the public seam)."""

    def __init__(self) -> None:
        self.targets: dict[str, list[torch.Tensor]] = {}
        self.class_weights: list[Any] = []

    def __call__(self, runs: Any, batches: Any) -> dict[str, torch.Tensor]:
        for run in runs:
            self.targets.setdefault(run.name, []).append(batches[run.name].targets.clone())
            self.class_weights.append(run.loss.class_weights)
        return super().__call__(runs, batches)


def with_recording_step(config: dict[str, Any]) -> tuple[dict[str, Any], RecordingStep]:
    """``config`` whose runs all take the step ``recording`` (registered here; use inside registry_snapshot)."""
    recorder = RecordingStep()
    ibcore.register_step("recording")(lambda params, context: recorder)
    return {**config, "defaults": {**config["defaults"], "step": {"name": "recording"}}}, recorder


def state_of(trainer: Trainer, run: str) -> dict[str, torch.Tensor]:
    model = next(r.model for r in trainer.runs if r.name == run)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=atol, msg=key)


def test_runs_with_the_same_backbone_start_identical_whatever_their_order(tmp_path: Path) -> None:
    config = tiny_config()
    config["runs"].insert(0, {"name": "cosine", "backbone": {"name": "small_cnn", "params": {"classifier": "cosine"}}})
    forward = make_trainer(config, tmp_path, "forward")
    reversed_config = copy.deepcopy(config)
    reversed_config["runs"].reverse()
    backward = make_trainer(reversed_config, tmp_path, "backward")
    assert_same_state(state_of(forward, "ce"), state_of(forward, "focal"))
    assert_same_state(state_of(forward, "ce"), state_of(backward, "ce"))
    assert_same_state(state_of(forward, "cosine"), state_of(backward, "cosine"))
    # a different backbone spec is a different model
    assert not torch.equal(
        state_of(forward, "ce")["classifier.weight"], state_of(forward, "cosine")["classifier.weight"]
    )


def fused_vs_sequential(tmp_path: Path, epochs: int) -> tuple[Trainer, Trainer]:
    # Same memory layout on both paths, so float32 sums differ only where vmap groups convolutions.
    config = tiny_config(epochs=epochs, channels_last=False)
    config["runs"] = [
        {"name": "ce"},
        {"name": "focal", "loss": {"name": "focal", "params": {"gamma": 1.0}}},
        {
            "name": "mixup",
            "mixer": {"name": "input_mixup", "params": {"alpha": 1.0}},
            "optimizer": {
                "name": "sgd",
                "params": {
                    "lr": 0.02,
                    "momentum": 0.8,
                    "nesterov": True,
                    "no_weight_decay_on_bias_and_norm": True,
                    "warmup_epochs": 1,
                    "warmup_per_iteration": True,
                },
            },
        },
    ]
    fused = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "fused")
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
    fused.fit()
    sequential.fit()
    assert fused.fused_step is not None and sequential.fused_step is None
    assert json.loads((fused.run_dir / "meta.json").read_text())["fused_groups"] == [["ce", "focal", "mixup"]]
    return fused, sequential


def test_fused_training_matches_the_sequential_reference(tmp_path: Path, float64: None) -> None:
    # Two epochs = 16 steps with momentum, Nesterov, weight decay exemptions, per-iteration warm-up,
    # a mixer and BatchNorm statistics: in float64 the two paths agree to rounding error.
    fused, sequential = fused_vs_sequential(tmp_path, epochs=2)
    for run in ("ce", "focal", "mixup"):
        assert_same_state(state_of(fused, run), state_of(sequential, run), atol=1e-9)
        fused_opt = next(r.optimizer for r in fused.runs if r.name == run)
        seq_opt = next(r.optimizer for r in sequential.runs if r.name == run)
        for p_f, p_s in zip(fused_opt.param_groups[0]["params"], seq_opt.param_groups[0]["params"], strict=True):
            torch.testing.assert_close(
                fused_opt.state[p_f]["momentum_buffer"], seq_opt.state[p_s]["momentum_buffer"], atol=1e-9, rtol=1e-9
            )


def test_fused_training_in_float32_stays_close_to_the_reference(tmp_path: Path) -> None:
    # float32 sums in another order (grouped convolutions); after one epoch the weights still agree closely.
    fused, sequential = fused_vs_sequential(tmp_path, epochs=1)
    for run in ("ce", "focal", "mixup"):
        a, b = state_of(fused, run), state_of(sequential, run)
        for key in a:
            if a[key].is_floating_point():
                scale = b[key].abs().max().item() + 1e-3
                assert (a[key] - b[key]).abs().max().item() <= 5e-3 * scale, key


def test_runs_sharing_a_sampler_see_the_same_batches_and_others_get_their_own(tmp_path: Path) -> None:
    config = tiny_config(fused="off")
    config["runs"].append({"name": "balanced", "sampler": {"name": "class_balanced"}})
    with ibcore.registry_snapshot():
        config, recorder = with_recording_step(config)
        make_trainer(config, tmp_path).fit()
    seen = recorder.targets
    assert all(torch.equal(a, b) for a, b in zip(seen["ce"], seen["focal"], strict=True))
    balanced = torch.cat(seen["balanced"][: len(seen["balanced"]) // 2])
    natural = torch.cat(seen["ce"][: len(seen["ce"]) // 2])
    # the class-balanced stream draws tail classes far more often than the natural one
    assert (balanced >= 6).float().mean() > 3 * (natural >= 6).float().mean()


def test_deferred_reweighting_stage_switches_class_weights_at_its_epoch(tmp_path: Path) -> None:
    config = tiny_config(epochs=3)
    config["runs"] = [
        {
            "name": "ldam_drw",
            "backbone": {"name": "small_cnn", "params": {"classifier": "cosine"}},
            "loss": {"name": "ldam"},
            "stages": [
                {
                    "from_epoch": 2,
                    "loss": {"name": "ldam", "params": {"class_weights": {"name": "effective_number", "beta": 0.999}}},
                }
            ],
        }
    ]
    with ibcore.registry_snapshot():
        config, recorder = with_recording_step(config)
        trainer = make_trainer(config, tmp_path)
        trainer.fit()
    steps = len(recorder.class_weights) // 3  # three epochs of equal length
    assert len(recorder.class_weights) == 3 * steps
    assert all(weights is None for weights in recorder.class_weights[: 2 * steps])
    weights = torch.as_tensor(recorder.class_weights[2 * steps])
    counts = torch.tensor(trainer.context.class_counts, dtype=torch.float64)
    expected = (1 - 0.999) / (1 - 0.999**counts)
    expected = expected / expected.sum() * len(counts)
    torch.testing.assert_close(weights.double().cpu(), expected, atol=1e-5, rtol=1e-5)


def test_classifier_retraining_freezes_the_backbone_and_retrains_the_classifier(tmp_path: Path) -> None:
    config = tiny_config(epochs=3)
    config["runs"] = [
        {
            "name": "crt",
            "stages": [
                {
                    "from_epoch": 2,
                    "retrain_classifier": True,
                    "sampler": {"name": "class_balanced"},
                    "optimizer": {"name": "sgd", "params": {"lr": 0.1, "momentum": 0.9}},
                }
            ],
        }
    ]
    trainer = make_trainer(config, tmp_path)
    trainer.fit()
    after_two = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch-0002.pt")["runs"]["crt"]["model"]
    final = state_of(trainer, "crt")
    for key, value in final.items():
        if key.startswith("classifier."):
            assert not torch.equal(value, after_two[key]), f"{key} should have been retrained"
        else:  # backbone weights and BatchNorm statistics stay frozen
            assert torch.equal(value, after_two[key]), f"{key} changed during classifier re-training"


def test_crt_draws_its_new_classifier_from_the_seed_not_from_the_global_random_stream(tmp_path: Path) -> None:
    """Under torchrun each rank's global stream stands elsewhere than one process's: the re-initialised
    classifier must not depend on it, or two processes and one would train different models."""

    class Seed(ibcore.Params):
        seed: int

    def stream_mover(params: Seed, context: ibcore.BuildContext) -> Any:
        """Cross-entropy, built after moving the global stream: a stage builds it just before cRT's re-init."""
        torch.manual_seed(params.seed)
        return ibcore.build("loss", "cross_entropy", {}, context=context)

    states = []
    with ibcore.registry_snapshot():
        ibcore.register_loss("stream_mover", Seed)(stream_mover)
        for elsewhere in (1, 2):
            config = tiny_config(epochs=3)
            stage = {
                "from_epoch": 2,
                "retrain_classifier": True,
                "loss": {"name": "stream_mover", "params": {"seed": elsewhere}},
            }
            config["runs"] = [{"name": "crt", "stages": [stage]}]
            trainer = make_trainer(config, tmp_path, f"stream{elsewhere}")
            trainer.fit()
            states.append(state_of(trainer, "crt"))
    assert_same_state(*states)


NAN_PLUGIN = '''
import torch
import torch.nn.functional as F
from ibcore import register_loss

class _ExplodingLoss:
    """Cross-entropy that turns NaN on its fourth call (to test that one failed run stops alone)."""
    class_weights = None
    def __init__(self):
        self.calls = 0
    def __call__(self, logits, targets, sample_weight=None):
        self.calls += 1
        loss = F.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls >= 4 else loss

@register_loss("exploding_ce")
def build_exploding(params, context):
    """Cross-entropy that becomes NaN on the fourth step."""
    return _ExplodingLoss()
'''


def exploding_experiment(tmp_path: Path, module: str, **trainer: Any) -> Path:
    """tiny_config plus a run whose plugin loss turns NaN on its fourth call, written next to its plugin
    (each test its own module name: imported modules are cached)."""
    (tmp_path / f"{module}.py").write_text(NAN_PLUGIN)
    config = tiny_config(**trainer)
    config["plugins"] = [module]
    config["runs"].append({"name": "exploding", "loss": {"name": "exploding_ce"}})
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config))
    return path


def test_a_run_whose_loss_turns_nan_stops_and_the_others_finish(tmp_path: Path) -> None:
    path = exploding_experiment(tmp_path, "nan_plugin", epochs=3, fused="off")
    with ibcore.registry_snapshot():
        results = ibcore.run(path, out_dir=tmp_path / "out", quiet=True)
    status = {row["run"]: row["status"] for row in results.rows}
    assert status["ce"] == "ok" and status["focal"] == "ok"
    # the fourth call of the loss is in the first epoch, its fourth batch
    assert status["exploding"] == "failed: non-finite loss at epoch 1, batch 4"
    assert results.row("ce")["epoch"] == 3 and results.row("ce")["acc1"] > 0
    train = [m for m in results.history if m["split"] == "train" and m["run"] == "exploding"]
    assert [m["epoch"] for m in train] == [1] and train[0]["failed"] == "non-finite loss at epoch 1, batch 4"


def test_with_graphs_a_plugin_loss_that_does_not_opt_in_steps_kernel_by_kernel(tmp_path: Path) -> None:
    """The exploding loss counts its calls in Python: replayed from a graph it would never turn NaN."""
    path = exploding_experiment(tmp_path, "nan_plugin_graphs", epochs=2, fused="on")
    with ibcore.registry_snapshot():
        (tmp_path / "run").mkdir()
        trainer = Trainer(load_experiment(path), tmp_path / "run", quiet=True, graph_runner=ReplayByRunning)
        assert trainer.fused_step is not None
        results = trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "CUDA graphs: run 'exploding' steps kernel by kernel: its loss does not declare cuda_graph_safe" in log
    assert "CUDA graphs: the training step of ce, focal is captured" in log and trainer.fused_step.graph_replays > 0
    status = {row["run"]: row["status"] for row in results.rows}
    assert status == {"ce": "ok", "focal": "ok", "exploding": "failed: non-finite loss at epoch 1, batch 4"}


def test_results_files_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = ibcore.run(tiny_config(), out_dir=tmp_path, quiet=True)
    run_dir = results.run_dir
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "results.md", "results.csv", "results.json", "train.log"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # every epoch number counts completed epochs: the lines after the first epoch say 1, the last 2
    evals = [line for line in lines if line["split"] == "test"]
    assert {(line["run"], line["epoch"]) for line in evals} == {("ce", 1), ("ce", 2), ("focal", 1), ("focal", 2)}
    assert [line["epoch"] for line in lines if line["split"] == "train" and line["run"] == "ce"] == [1, 2]
    assert results.row("ce")["epoch"] == 2 == max(line["epoch"] for line in lines)
    # plain keys in files and APIs; the display labels head the tables
    row = results.row("ce")
    assert 0 <= row["acc1"] <= 100 and {"many_acc", "medium_acc", "few_acc"} <= row.keys()
    assert evals[0].keys() >= {"acc1", "many_acc", "medium_acc", "few_acc", "shot_groups"}
    csv_header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert csv_header == "run,method,seed,epoch,acc1,many_acc,medium_acc,few_acc,status"
    summary_header = (run_dir / "summary.csv").read_text().splitlines()[0]
    assert summary_header.startswith("method,seeds,n,status,acc1_mean,acc1_std,acc1_n,many_acc_mean")
    payload = json.loads((run_dir / "results.json").read_text())
    assert payload["labels"]["acc1"] == "acc@1 (%)" and "acc1" in payload["summary"][0]["metrics"]
    markdown = (run_dir / "results.md").read_text()
    assert "| run | epoch | acc@1 (%) | many (%) | medium (%) | few (%) | status |" in markdown
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["torch"] == torch.__version__ and meta["class_counts"][0] == 480
    assert meta["metrics_format"] == 2
    log = (run_dir / "train.log").read_text()
    assert "epoch 2/2:" in log and "epoch 2: test acc@1 (%) ce=" in log
    (run_dir / "results.md").unlink()
    capsys.readouterr()
    assert ibcore.cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "results.md").read_text() == markdown
    assert "acc@1" in capsys.readouterr().out


def test_best_on_validation_rows_name_the_epoch_chosen_on_the_headline_metric(tmp_path: Path) -> None:
    """The best row of a run is the test evaluation of the epoch whose validation acc1 was highest (the first
    such epoch), its epoch counted as everywhere: epochs completed."""
    import numpy as np

    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(4), [40, 20, 10, 5])).astype(np.uint8)
    held_out = np.tile(np.arange(4), 6).astype(np.uint8)
    npz = tmp_path / "data.npz"
    np.savez(
        npz,
        **{
            f"{split}_images": rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
            for split, labels in (("train", train_labels), ("test", held_out), ("val", held_out))
        },
        train_labels=train_labels,
        test_labels=held_out,
        val_labels=held_out,
    )
    config = {
        "seed": 0,
        "data": {"dataset": {"name": "array_file", "params": {"path": str(npz), "pad": 1}}, "batch_size": 16},
        "trainer": {"epochs": 4, "eval_every": 1, "device": "cpu"},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"in_channels": 3, "width": 4}},
            "optimizer": {"name": "sgd", "params": {"lr": 0.1}},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [
            {"name": "ce", "posthoc": [{"name": "posthoc_logit_adjustment"}]},
            {"name": "focal", "loss": {"name": "focal"}},
        ],
        # shot_accuracy declares no headline: the headline is accuracy's acc1
        "evaluators": [{"name": "shot_accuracy"}, {"name": "accuracy"}],
    }
    results = ibcore.run(config, out_dir=tmp_path / "out", quiet=True)
    assert [row["run"] for row in results.best_rows] == ["ce", "ce+posthoc_logit_adjustment", "focal"]
    for best in results.best_rows:
        val = results.metrics(best["run"], split="val")
        assert [m["epoch"] for m in val] == [1, 2, 3, 4]
        chosen = max(val, key=lambda m: (m["acc1"], -m["epoch"]))  # the first epoch with the highest score
        test = next(m for m in results.metrics(best["run"]) if m["epoch"] == chosen["epoch"])
        assert best["epoch"] == chosen["epoch"] and best["acc1"] == test["acc1"], best["run"]
    assert "## Best epoch, selected on the validation split" in (results.run_dir / "results.md").read_text()
    assert "epoch 1: test acc@1 (%) ce=" in (results.run_dir / "train.log").read_text()


def test_a_bad_override_fails_before_anything_is_written(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps(tiny_config()))
    rc = ibcore.cli.main(
        ["run", str(config), "--quiet", "--out", str(tmp_path / "out"), "--set", "runs.ce.loss.params.gama=2"]
    )
    assert rc == 1
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_directory_is_reported_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainingError, match="cannot write the run directory"):
        ibcore.run(tiny_config(), out_dir=blocker / "runs", quiet=True)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    for epoch in (1, 2):
        save_checkpoint(directory, epoch, {"format": 1, "epoch": epoch, "w": torch.full((3,), float(epoch))}, keep=3)
    newest = directory / "epoch-0002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match="epoch-0002.pt: checksum mismatch"):
        state = load_latest(directory)
    assert state["epoch"] == 1


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    for epoch in range(1, 5):
        save_checkpoint(directory, epoch, {"format": 1, "epoch": epoch}, keep=2)
    assert sorted(p.name for p in directory.glob("*.pt")) == ["epoch-0003.pt", "epoch-0004.pt"]
    assert not list(directory.glob("*.tmp"))


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_resume_in_process_reaches_the_same_numbers(tmp_path: Path) -> None:
    config = tiny_config(epochs=3)
    config["runs"].append({"name": "mixup", "mixer": {"name": "input_mixup"}})
    full = ibcore.run(config, out_dir=tmp_path / "full", quiet=True)
    partial = make_trainer(config, tmp_path, "partial")
    partial.epochs = 2  # stop early, as if killed after the checkpoint of epoch 2
    partial.fit()
    resumed = Trainer(load_experiment(config), partial.run_dir, quiet=True)
    resumed.restore(load_latest(partial.run_dir / "checkpoints"))
    results = resumed.fit()
    for run in ("ce", "focal", "mixup"):
        assert_same_state(
            state_of(resumed, run),
            {
                k: v
                for k, v in load_checkpoint(full.run_dir / "checkpoints" / "epoch-0003.pt")["runs"][run][
                    "model"
                ].items()
            },
        )
        assert results.row(run)["acc1"] == full.row(run)["acc1"]
    # the resumed metrics.jsonl holds the lines of the uninterrupted run, epochs counted the same way
    strip = {"seconds"}
    resumed_lines = [{k: v for k, v in m.items() if k not in strip} for m in results.history]
    assert resumed_lines == [{k: v for k, v in m.items() if k not in strip} for m in full.history]
    assert [m["epoch"] for m in full.metrics("ce")] == [1, 2, 3]


def test_a_checkpoint_of_an_older_ibcore_resumes_with_epochs_counted_as_completed(tmp_path: Path) -> None:
    """Before metrics_format 2 a checkpoint's history counted epochs from 0: restore shifts them, so the
    rewritten metrics.jsonl says what a new run says."""
    trainer = make_trainer(tiny_config(epochs=1), tmp_path, "old")
    trainer.fit()
    state = load_latest(trainer.run_dir / "checkpoints")
    new_epochs = [line["epoch"] for line in state["history"]]
    assert new_epochs == [1, 1, 1, 1] and state["metrics_format"] == 2
    del state["metrics_format"]
    state["history"] = [{**line, "epoch": line["epoch"] - 1} for line in state["history"]]
    resumed = Trainer(load_experiment(tiny_config(epochs=1)), trainer.run_dir, quiet=True)
    resumed.restore(state)
    assert [line["epoch"] for line in resumed.history] == new_epochs
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == new_epochs


def test_the_written_config_keeps_a_mixer_that_a_stage_does_not_mention(tmp_path: Path) -> None:
    from ibcore.engine import resolved_config
    from ibcore.engine.runs import effective_specs

    config = tiny_config(epochs=3)
    config["runs"] = [
        {
            "name": "remix_drw",
            "mixer": {"name": "input_mixup"},
            "stages": [
                {"from_epoch": 2, "loss": {"name": "cross_entropy", "params": {"class_weights": {"name": "inverse"}}}}
            ],
        }
    ]
    experiment = load_experiment(config)
    reloaded = load_experiment(resolved_config(experiment))  # what `ib resume` reads from config.yaml
    for epoch in range(3):
        assert effective_specs(reloaded.runs[0], epoch) == effective_specs(experiment.runs[0], epoch)
    assert effective_specs(reloaded.runs[0], 2).mixer is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", False), ("bf16", False), ("bf16", True)])
def test_cuda_graph_replay_trains_like_kernel_by_kernel_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, channels_last: bool
) -> None:
    """Real CUDA graphs: the fused group and the lone run are captured, replayed with a learning rate that
    changes every step, re-captured after a stage. The reference takes the same path with the same groups,
    except that each "replay" launches the step's kernels anew (the CPU stand-in)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, not TF32 (matmuls: off already)
    config = graph_path_config()
    config["trainer"].update(device="cuda", fused="on", precision=precision, channels_last=channels_last)
    graphed = make_trainer(config, tmp_path, "graphed")
    graphed.fit()
    log = (graphed.run_dir / "train.log").read_text()
    assert "3 runs stacked (ce, focal, mixup)" in log and "CUDA graphs:" in log
    assert "cannot be captured" not in log and "one after another" not in log, log
    assert "CUDA graphs: the training step of ce, focal, mixup, lone is captured" in log
    fused = graphed.fused_step
    assert fused is not None and fused.graph_replays > 3 * 5 and fused.groups_built == 3

    ReplayByRunning.captured = 0
    eager = make_trainer(config, tmp_path, "eager", graph_runner=ReplayByRunning)
    eager.fit()
    assert eager.fused_step is not None and ReplayByRunning.captured == 3
    assert eager.fused_step.graph_replays == fused.graph_replays

    def train_losses(trainer: Trainer) -> dict[tuple[str, int], float]:
        lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        return {(m["run"], m["epoch"]): m["train_loss"] for m in lines if m.get("split") == "train"}

    graphed_losses, eager_losses = train_losses(graphed), train_losses(eager)
    assert graphed_losses.keys() == eager_losses.keys()
    for key, value in graphed_losses.items():  # bf16 rounds coarsely: the same training, not the same bits
        assert value == pytest.approx(eager_losses[key], rel=0.05), key
    if precision == "fp32":  # cuDNN may pick other algorithms in the two trainers: close, not equal
        for run in ("ce", "focal", "lone", "mixup"):
            a, b = state_of(graphed, run), state_of(eager, run)
            for key in a:
                if a[key].is_floating_point():
                    torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=1e-3, msg=f"{run}: {key}")


def test_a_fused_group_is_reused_across_epochs_until_a_stage_changes_a_run(tmp_path: Path, float64: None) -> None:
    """Reuse keeps a captured CUDA graph valid; a stage (here DRW-style re-weighting) must rebuild the group."""
    config = tiny_config(epochs=3, channels_last=False)
    plain = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "plain")
    plain.fit()
    assert plain.fused_step is not None and plain.fused_step.groups_built == 1

    config["runs"][1]["stages"] = [{"from_epoch": 2, "loss": {"name": "focal", "params": {"gamma": 2.0}}}]
    fused = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "staged")
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
    fused.fit()
    sequential.fit()
    assert fused.fused_step is not None and fused.fused_step.groups_built == 2
    for run in ("ce", "focal"):
        assert_same_state(state_of(fused, run), state_of(sequential, run), atol=1e-9)


class ReplayByRunning:
    """Stands in for a CUDA graph on the CPU, with the same contract: capturing runs nothing; a replay copies
    the batch into the static tensors and runs the captured step on them."""

    captured = 0

    def __init__(self, step: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        type(self).captured += 1
        self.step = step
        self.inputs = tuple(t.clone(memory_format=torch.preserve_format) for t in inputs)

    fits = CapturedStep.fits

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        return self.step(*self.inputs)  # type: ignore[no-any-return]


def graph_path_config() -> dict[str, Any]:
    """Per-iteration warm-up (the learning rate changes every step), a stage at epoch 2 and a lone run."""
    config = tiny_config(epochs=3, channels_last=False)
    warmup = {**SGD["params"], "warmup_epochs": 2, "warmup_per_iteration": True}
    config["runs"] = [
        {"name": "ce", "optimizer": {"name": "sgd", "params": warmup}},
        {
            "name": "focal",
            "loss": {"name": "focal", "params": {"gamma": 1.0}},
            "stages": [{"from_epoch": 2, "loss": {"name": "focal", "params": {"gamma": 2.0}}}],
        },
        {"name": "lone", "backbone": {"name": "small_cnn", "params": {"classifier": "cosine"}}},
        # mixes its inputs: stacked with (ce, focal) and replayed too, each step with its own new plan
        {"name": "mixup", "mixer": {"name": "input_mixup", "params": {"alpha": 1.0}}},
    ]
    return config


@pytest.mark.parametrize(("capture_fails", "seeds"), [(False, None), (True, None), (False, [0, 1])])
def test_the_graph_path_trains_like_the_sequential_reference(
    tmp_path: Path, float64: None, capture_fails: bool, seeds: list[int] | None
) -> None:
    """The CUDA-graph control flow on the CPU: warm-up step, capture, replays with fresh learning rates, the
    last smaller batch kernel by kernel, re-capture after a stage; or, when capture fails, eager steps. With
    seeds, each group stacks the runs of both seeds, each replay on its own seed's batch."""

    class FailingCapture(ReplayByRunning):
        def __init__(self, *args: Any) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    ReplayByRunning.captured = 0
    config = graph_path_config()
    if seeds:
        config["seeds"] = seeds
    runner = FailingCapture if capture_fails else ReplayByRunning
    on = {**config, "trainer": {**config["trainer"], "fused": "on"}}
    graphed = make_trainer(on, tmp_path, "graphed", graph_runner=runner)
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
    fused = graphed.fused_step
    assert fused is not None and fused.graphs
    graphed.fit()
    sequential.fit()
    log = (graphed.run_dir / "train.log").read_text()
    if capture_fails:
        assert fused.graph_replays == 0
        assert "CUDA graphs: the step of ce, focal, mixup cannot be captured; it runs kernel by kernel" in log
    else:
        # (ce, focal, mixup) and the lone run in epoch 0, kept through epoch 1; the stage at epoch 2 rebuilds
        # (ce, focal, mixup)
        assert ReplayByRunning.captured == 3 and fused.groups_built == 3
        assert fused.graph_replays > 3 * 5
        assert "cannot be captured" not in log
    if not capture_fails and not seeds:
        assert "CUDA graphs: the training step of ce, focal, mixup, lone is captured" in log
    if seeds:
        graphed_runs = "ce@seed0, ce@seed1, focal@seed0, focal@seed1, mixup@seed0, mixup@seed1, lone@seed0"
        assert f"CUDA graphs: the training step of {graphed_runs}" in log
    for run in sequential.runs:
        assert_same_state(state_of(graphed, run.name), state_of(sequential, run.name), atol=1e-9)


def test_data_on_device_on_refuses_a_split_it_cannot_keep_there() -> None:
    """'on' is a promise: a split read from files must not silently go through a DataLoader instead."""
    from ibcore.engine.batches import LoaderData, make_data
    from ibcore.errors import DataError

    files_split = [(torch.zeros(3, 8, 8), 0)] * 4  # indexable, no tensors()/AugmentSpec: like image_list
    where = "the training split of dataset 'image_list'"
    with pytest.raises(DataError, match=r"data_on_device is 'on', but the training split of dataset 'image_list'"):
        make_data(files_split, torch.device("cpu"), "on", 0, where)
    assert isinstance(make_data(files_split, torch.device("cpu"), "auto", 0, where), LoaderData)


def lws_config(epochs: int = 3, from_epoch: int = 2) -> dict[str, Any]:
    config = tiny_config(epochs=epochs)
    config["runs"] = [
        {"name": "ce"},
        {
            "name": "lws",
            "stages": [
                {
                    "from_epoch": from_epoch,
                    "scale_classifier": True,
                    "sampler": {"name": "class_balanced"},
                    "optimizer": {"name": "sgd", "params": {"lr": 0.5, "momentum": 0.9}},
                }
            ],
        },
    ]
    return config


def test_lws_learns_only_a_scale_per_class_on_the_frozen_model(tmp_path: Path) -> None:
    """Kang et al. 2020 (LWS): backbone, BatchNorm statistics and classifier stay as trained; one scale per
    class, starting at 1, multiplies the logits."""
    trainer = make_trainer({**lws_config(), "trainer": {**lws_config()["trainer"], "fused": "on"}}, tmp_path)
    trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "trains on its own" not in log  # a frozen backbone is stacked like any other (tests/test_fused_paths.py)
    after_two = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch-0002.pt")["runs"]["lws"]["model"]
    final = state_of(trainer, "lws")
    assert set(final) - set(after_two) == {"classifier.class_scale"}
    for key, value in after_two.items():  # nothing else moved
        assert torch.equal(final[key], value), f"{key} changed during LWS"
    scale = final["classifier.class_scale"]
    assert scale.shape == (10,) and not torch.allclose(scale, torch.ones(10))

    run = next(r for r in trainer.runs if r.name == "lws")
    model = run.model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        features = model.features(x)
        plain = torch.nn.functional.linear(features, model.classifier.weight, model.classifier.bias)
        torch.testing.assert_close(model(x), plain * scale)


def test_resuming_during_lws_reaches_the_same_numbers(tmp_path: Path) -> None:
    config = lws_config(epochs=3, from_epoch=1)
    full = ibcore.run(config, out_dir=tmp_path / "full", quiet=True)
    partial = make_trainer(config, tmp_path, "partial")
    partial.epochs = 2  # stopped after the checkpoint of epoch 2, inside the LWS stage
    partial.fit()
    resumed = Trainer(load_experiment(config), partial.run_dir, quiet=True)
    resumed.restore(load_latest(partial.run_dir / "checkpoints"))
    results = resumed.fit()
    reference = load_checkpoint(full.run_dir / "checkpoints" / "epoch-0003.pt")["runs"]["lws"]["model"]
    assert_same_state(state_of(resumed, "lws"), reference)
    assert results.row("lws")["acc1"] == full.row("lws")["acc1"]


@pytest.mark.parametrize("batchnorm", ["frozen", "update"])
def test_mislas_stage_trains_classifier_and_scales_on_a_frozen_backbone(tmp_path: Path, batchnorm: str) -> None:
    """MiSLAS stage 2 (dvlab-research/MiSLAS train_stage2.py): the trained classifier (not re-initialised) and one
    scale per class learn together; the backbone's weights stay; with shift_bn (`batchnorm: update`) its BatchNorm
    running statistics are re-estimated on the stage's batches, otherwise they stay too."""
    config = lws_config()
    stage = config["runs"][1]["stages"][0]
    stage.update({"train_classifier": True, "batchnorm": batchnorm})
    trainer = make_trainer(config, tmp_path)
    trainer.fit()
    after_two = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch-0002.pt")["runs"]["lws"]["model"]
    final = state_of(trainer, "lws")
    moved = {key for key, value in after_two.items() if not torch.equal(final[key], value)}
    statistics = {key for key in after_two if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert {"classifier.weight", "classifier.bias"} <= moved
    assert not torch.allclose(final["classifier.class_scale"], torch.ones(10))
    backbone_weights = {k for k in after_two if not k.startswith("classifier.")} - statistics
    assert not moved & backbone_weights
    assert (moved & statistics == statistics) if batchnorm == "update" else not (moved & statistics)


def test_batchnorm_and_train_classifier_are_checked_against_the_other_stage_flags() -> None:
    config = lws_config()
    config["runs"][0]["stages"] = [{"from_epoch": 1, "batchnorm": "update", "loss": {"name": "cross_entropy"}}]
    config["runs"][1]["stages"][0].update({"retrain_classifier": True, "train_classifier": True})
    del config["runs"][1]["stages"][0]["scale_classifier"]
    issues = {issue.path: issue.message for issue in ibcore.validate(config)}
    assert issues["runs[0].stages[0].batchnorm"].startswith("applies only while the backbone is frozen")
    assert issues["runs[1].stages[0].train_classifier"].startswith("retrain_classifier trains a new classifier")


class CountingSplit:
    """A split read item by item (through the DataLoader path), counting the reads."""

    def __init__(self, split: Any) -> None:
        self.split, self.targets, self.reads = split, split.targets, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Any:
        self.reads += 1
        return self.split[index]


def test_the_runs_of_a_seed_read_the_test_split_once_per_evaluation(tmp_path: Path) -> None:
    """With image files, reading is decoding: three runs must not decode the test set three times."""
    counted: list[CountingSplit] = []

    def counted_mnist(params: Any, context: Any) -> Any:
        dataset = ibcore.build("dataset", "mnist_lt", {"imbalance_ratio": 100, "test_per_class": 20}, context=context)
        dataset.test = CountingSplit(dataset.test)
        counted.append(dataset.test)
        return dataset

    config = tiny_config(epochs=2)
    config["data"]["dataset"] = {"name": "counted_mnist"}
    config["runs"].append(
        {"name": "bs", "loss": {"name": "balanced_softmax"}, "posthoc": [{"name": "posthoc_logit_adjustment"}]}
    )
    with ibcore.registry_snapshot():
        ibcore.register_dataset("counted_mnist")(counted_mnist)
        results = ibcore.run(config, out_dir=tmp_path, quiet=True)
    (split,) = counted
    assert split.reads == 2 * len(split)  # two evaluations (eval_every 1), each reading the 200 images once
    assert {row["run"] for row in results.rows} >= {"ce", "focal", "bs"}
