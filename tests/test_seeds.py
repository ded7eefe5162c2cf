"""Seeds as an axis of runs: repeats equal separate single-seed experiments, tables show mean ± std (n)."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import assert_same_state, make_trainer, state_of, tiny_config

import ibcore
import ibcore.cli
from ibcore.config import validate
from ibcore.report.summary import summarise
from ibcore.report.tables import to_markdown


def seeds_config(**trainer: Any) -> dict[str, Any]:
    """tiny_config with runs that draw from every seeded stream: init, sampler, augmentation, mixer, cRT."""
    config = tiny_config(epochs=2, **trainer)
    config["data"]["dataset"]["params"]["augment"] = True
    config["runs"] = [
        {"name": "ce", "posthoc": [{"name": "posthoc_logit_adjustment"}]},
        {"name": "mixup", "mixer": {"name": "input_mixup", "params": {"alpha": 1.0}}},
        {"name": "cb_sampling", "sampler": {"name": "class_balanced"}},
        {
            "name": "crt",
            "stages": [{"from_epoch": 1, "retrain_classifier": True, "sampler": {"name": "class_balanced"}}],
        },
    ]
    return config


def test_a_repeat_is_bit_for_bit_the_separate_single_seed_experiment(tmp_path: Path) -> None:
    config = seeds_config()
    config["seeds"] = [0, 1]
    together = make_trainer(config, tmp_path, "together")
    assert [run.name for run in together.runs] == [
        "ce@seed0", "ce@seed1", "mixup@seed0", "mixup@seed1",
        "cb_sampling@seed0", "cb_sampling@seed1", "crt@seed0", "crt@seed1",
    ]  # fmt: skip
    together_results = together.fit()
    # the same runs trained by separate experiments with `seed: 1`: cRT alone, the others together
    for methods in (["crt"], ["ce", "mixup", "cb_sampling"]):
        alone_config = copy.deepcopy(config)
        del alone_config["seeds"]
        alone_config["seed"] = 1
        alone_config["runs"] = [run for run in config["runs"] if run["name"] in methods]
        alone = make_trainer(alone_config, tmp_path, f"alone-{methods[0]}")
        alone_results = alone.fit()
        for method in methods:
            assert_same_state(state_of(together, f"{method}@seed1"), state_of(alone, method))
            ours = together_results.row(f"{method}@seed1")
            theirs = alone_results.row(method)
            assert {k: v for k, v in ours.items() if k not in ("run", "seed")} == {
                k: v for k, v in theirs.items() if k not in ("run", "seed")
            }
    # the post-hoc variant of a repeat is that repeat adjusted, named like it
    assert together_results.row("ce+posthoc_logit_adjustment@seed1")["method"] == "ce+posthoc_logit_adjustment"
    # different seeds are different runs: initial weights, data draws and batches all differ
    assert not torch.equal(
        state_of(together, "ce@seed0")["classifier.weight"], state_of(together, "ce@seed1")["classifier.weight"]
    )


def test_the_dataset_subset_follows_the_seed_unless_pinned(tmp_path: Path) -> None:
    config = tiny_config()
    config["seeds"] = [0, 1]
    follows = make_trainer(config, tmp_path, "follows")
    assert follows.data[0] is not follows.data[1]  # mnist_lt draws its training subset from the run's seed
    config["data"]["dataset"]["params"]["subset_seed"] = 5
    pinned = make_trainer(config, tmp_path, "pinned")
    assert pinned.data[0] is pinned.data[1]


def test_the_summary_is_mean_and_sample_std_of_the_seed_rows(tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    config["seeds"] = [0, 1, 2]
    config["runs"][0]["reference"] = {"acc1": 70.36, "source": "LDAM-DRW Table 2"}
    config["runs"][1]["reference"] = {"acc@1 (%)": 50.0, "source": "a label names its key"}  # display label
    results = ibcore.run(config, out_dir=tmp_path, quiet=True)
    payload = json.loads((results.run_dir / "results.json").read_text())
    assert [row["run"] for row in payload["last"]] == [f"{m}@seed{s}" for m in ("ce", "focal") for s in (0, 1, 2)]
    summary = {row["run"]: row for row in payload["summary"]}
    assert summary.keys() == {"ce", "focal"}
    for method in ("ce", "focal"):
        for metric in ("acc1", "few_acc"):
            values = [row[metric] for row in payload["last"] if row["method"] == method]
            stats = summary[method]["metrics"][metric]
            assert stats["n"] == 3 and stats["values"] == values
            assert stats["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert stats["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    ce = summary["ce"]
    assert ce["reference"] == {"source": "LDAM-DRW Table 2", "acc1": 70.36}
    assert ce["difference"]["acc1"] == pytest.approx(ce["metrics"]["acc1"]["mean"] - 70.36)
    focal = summary["focal"]
    assert focal["reference"] == {"source": "a label names its key", "acc1": 50.0}
    assert focal["difference"]["acc1"] == pytest.approx(focal["metrics"]["acc1"]["mean"] - 50.0)
    assert "is no metric of the results" not in (results.run_dir / "train.log").read_text()
    # the tables print one row per method, as "mean ± std (n)", with the published value and our difference
    markdown = (results.run_dir / "results.md").read_text()
    acc = ce["metrics"]["acc1"]
    assert f"{acc['mean']:.2f} ± {acc['std']:.2f} (3)" in markdown
    assert "| 70.36 | " + f"{ce['difference']['acc1']:+.2f}" in markdown
    assert "- ce: LDAM-DRW Table 2" in markdown and "Per seed:" in markdown
    summary_csv = (results.run_dir / "summary.csv").read_text().splitlines()
    assert summary_csv[0].startswith("method,seeds,n,status,acc1_mean,acc1_std,acc1_n")
    assert summary_csv[0].endswith(",acc1_published,acc1_difference")
    assert summary_csv[1].startswith("ce,0 1 2,3,ok,")
    # `ib report` renders the same tables from results.json
    (results.run_dir / "results.md").unlink()
    assert ibcore.cli.main(["report", str(results.run_dir)]) == 0
    assert (results.run_dir / "results.md").read_text() == markdown


def test_a_failed_seed_is_counted_and_not_averaged(tmp_path: Path) -> None:
    rows = [
        {"run": "ce@seed0", "method": "ce", "seed": 0, "status": "ok", "epoch": 3, "acc1": 70.0},
        {"run": "ce@seed1", "method": "ce", "seed": 1, "status": "failed: non-finite loss at epoch 2, batch 4",
         "epoch": 1, "acc1": 10.0},
        {"run": "ce@seed2", "method": "ce", "seed": 2, "status": "ok", "epoch": 3, "acc1": 74.0},
    ]  # fmt: skip
    (summary,) = summarise(rows)
    assert summary["status"] == "failed 1 of 3 (seed 1: non-finite loss at epoch 2, batch 4)"
    assert summary["n"] == 2 and summary["metrics"]["acc1"]["mean"] == 72.0
    assert "72.00 ± 2.83 (2)" in to_markdown(rows)


NAN_ON_SEED_1 = '''
import torch.nn.functional as F
from ibcore import register_loss

@register_loss("nan_on_seed_1")
def build(params, context):
    """Cross-entropy that is NaN for the runs of seed 1."""
    def loss(logits, targets, sample_weight=None):
        value = F.cross_entropy(logits, targets)
        return value * float("nan") if context.seed == 1 else value
    return loss
'''


def test_a_run_that_fails_in_one_seed_is_shown_in_the_table(tmp_path: Path) -> None:
    (tmp_path / "nan_on_seed.py").write_text(NAN_ON_SEED_1)
    config = tiny_config(epochs=1, fused="off")
    config["seeds"] = [0, 1]
    config["plugins"] = ["nan_on_seed"]
    config["runs"] = [{"name": "fragile", "loss": {"name": "nan_on_seed_1"}}]
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config))
    with ibcore.registry_snapshot():
        results = ibcore.run(path, out_dir=tmp_path / "out", quiet=True)
    assert results.row("fragile@seed0")["status"] == "ok"
    (summary,) = results.summary
    assert summary["status"] == "failed 1 of 2 (seed 1: non-finite loss at epoch 1, batch 1)"
    assert summary["n"] == 1 and summary["metrics"]["acc1"]["values"] == [results.row("fragile@seed0")["acc1"]]


def test_fused_runs_of_several_seeds_stack_and_match_the_sequential_reference(tmp_path: Path, float64: None) -> None:
    config = tiny_config(epochs=2, channels_last=False)
    config["data"]["dataset"]["params"]["augment"] = True
    config["seeds"] = [0, 1]
    config["runs"].append({"name": "mixup", "mixer": {"name": "input_mixup", "params": {"alpha": 1.0}}})
    fused = make_trainer({**config, "trainer": {**config["trainer"], "fused": "on"}}, tmp_path, "fused")
    sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
    fused.fit()
    sequential.fit()
    groups = json.loads((fused.run_dir / "meta.json").read_text())["fused_groups"]
    assert sorted(groups[0]) == sorted(f"{m}@seed{s}" for m in ("ce", "focal", "mixup") for s in (0, 1))
    for run in sequential.runs:
        assert_same_state(state_of(fused, run.name), state_of(sequential, run.name), atol=1e-9)


def test_seeds_from_the_command_line_and_their_validation(tmp_path: Path, ib_cli: Any) -> None:
    config = tiny_config(epochs=1)
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config))
    result = ib_cli(
        "run", str(path), "--set", "seeds=[4, 7]", "--set", f"trainer.out_dir={tmp_path / 'out'}", "--quiet"
    )
    assert result.rc == 0, result.output
    assert "ce@seed4" in (next((tmp_path / "out").iterdir()) / "results.md").read_text()
    bad = {**config, "seeds": [1, 2, 1], "runs": [{"name": "ce", "seeds": [-1]}]}
    issues = {issue.path: issue.message for issue in validate(bad)}
    assert "repeated: 1" in issues["seeds"]
    assert "runs[0].seeds[0]" in issues
    assert any(path == "seeds" for path in {i.path for i in validate({**config, "seeds": []})})


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"acc@1 (%)": 77.0}, "needs a 'source'"),
        ({"source": "a paper"}, "names no metric"),
        ({"acc@1 (%)": "high", "source": "a paper"}, "must be a finite number"),
    ],
)
def test_a_reference_needs_a_source_and_numbers(reference: dict[str, Any], message: str) -> None:
    config = tiny_config()
    config["runs"][0]["reference"] = reference
    config["runs"][0]["posthoc"] = [{"name": "tau_norm", "reference": reference}]
    issues = {issue.path: issue.message for issue in validate(config)}
    assert message in issues["runs[0].reference"] and message in issues["runs[0].posthoc[0].reference"]


def test_a_runs_own_seeds_override_the_top_level_ones() -> None:
    from ibcore.engine.repeats import expand_runs

    config = tiny_config()
    config["seeds"] = [0, 1]
    config["runs"][1]["seeds"] = [7]
    repeats = expand_runs(ibcore.load_experiment(config))
    assert [(r.name, r.method, r.seed) for r in repeats] == [
        ("ce@seed0", "ce", 0), ("ce@seed1", "ce", 1), ("focal@seed7", "focal", 7)
    ]  # fmt: skip
    del config["seeds"]
    assert [r.name for r in expand_runs(ibcore.load_experiment(config))] == ["ce", "focal@seed7"]
