"""Round 2 (issue 14), the engine side: a run that could take no step, images a backbone cannot take, hostile
metrics files for `ib report`, and evaluators that return NaN or infinity. Each is refused or recorded with a
clear message, never a traceback, before the run directory fills."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from _support import no_traceback

import ibcore
from ibcore.report import read_metrics


def mnist_config(tmp_path: Path, **data: Any) -> Path:
    config = {
        "data": {"dataset": {"name": "mnist_lt", "params": {"test_per_class": 10}}, "batch_size": 64, **data},
        "trainer": {"epochs": 1, "device": "cpu"},
        "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": {"name": "sgd"}},
        "runs": [{"name": "ce", "loss": {"name": "cross_entropy"}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_a_batch_larger_than_the_epoch_with_drop_last_is_refused(tmp_path: Path, ib_cli: Any) -> None:
    # mnist_lt at imbalance 10 keeps 1,000-odd training images: a batch of 5,000 with drop_last takes no step
    path = mnist_config(tmp_path, batch_size=5000, drop_last=True)
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "data.batch_size: 5000 is more than the" in message and "would take no optimisation step" in message
    assert not (tmp_path / "out").exists()  # nothing written
    # without drop_last the one short batch trains
    ok = mnist_config(tmp_path, batch_size=5000, drop_last=False)
    assert ib_cli("run", str(ok), "--quiet", "--out", str(tmp_path / "out2")).rc == 0


def test_rgb_images_into_a_one_channel_network_are_reported_at_the_backbone(tmp_path: Path, ib_cli: Any) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [6, 4, 2])
    np.savez(
        tmp_path / "rgb.npz",
        train_images=rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8),
        train_labels=labels,
        test_images=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
        test_labels=np.arange(3),
    )
    config = {
        "data": {"dataset": {"name": "array_file", "params": {"path": str(tmp_path / "rgb.npz")}}, "batch_size": 4},
        "trainer": {"epochs": 1, "device": "cpu"},
        "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": {"name": "sgd"}},  # in_channels: 1
        "runs": [{"name": "ce", "loss": {"name": "cross_entropy"}}],
    }
    path = tmp_path / "rgb.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert "runs[0].backbone: backbone 'small_cnn' cannot take the images" in message and "(3, 16, 16)" in message
    assert not (tmp_path / "out").exists()
    config["defaults"]["backbone"]["params"] = {"in_channels": 3}
    path.write_text(json.dumps(config), encoding="utf-8")
    assert ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out")).rc == 0


def test_ib_report_skips_damaged_metrics_lines_and_says_which(tmp_path: Path, ib_cli: Any) -> None:
    results = ibcore.run(json.loads(mnist_config(tmp_path).read_text()), out_dir=tmp_path / "out", quiet=True)
    metrics = results.run_dir / "metrics.jsonl"
    good = metrics.read_bytes()
    metrics.write_bytes(good + b"[1, 2]\n" + b'{"split": "train", "run": "ce"}\n' + b"\xff\xfe oops\n")
    result = ib_cli("report", str(results.run_dir))
    assert result.rc == 0 and no_traceback(result.output), result.output
    output = " ".join(result.output.split())
    assert "metrics.jsonl line" in output and "skipped" in output
    assert len(read_metrics(metrics)) == good.count(b"\n")


def test_names_with_markup_brackets_are_printed_as_they_are(tmp_path: Path, ib_cli: Any) -> None:
    results = ibcore.run(json.loads(mnist_config(tmp_path).read_text()), out_dir=tmp_path / "out", quiet=True)
    payload = json.loads((results.run_dir / "results.json").read_text())
    for row in payload["last"]:
        row["run"] = row["method"] = "x[/]y[bold]"
    (results.run_dir / "results.json").write_text(json.dumps(payload))
    result = ib_cli("report", str(results.run_dir))
    assert result.rc == 0 and no_traceback(result.output), result.output
    assert "x[/]y[bold]" in result.output


NON_FINITE_EVALUATOR = """
from ibcore import register_evaluator

class Strange:
    labels = {"weird": "weird (%)"}
    def reset(self): pass
    def update(self, logits, targets): pass
    def compute(self): return {"weird": float("nan"), "huge": float("inf")}

@register_evaluator("ibtest_strange")
def build(params, context):
    return Strange()
"""


def test_a_nan_or_infinite_metric_is_written_as_strict_json_null_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "strange_eval.py").write_text(NON_FINITE_EVALUATOR, encoding="utf-8")
    config = json.loads(mnist_config(tmp_path).read_text())
    config["plugins"] = ["strange_eval"]
    config["evaluators"] = [{"name": "accuracy"}, {"name": "ibtest_strange"}]
    path = tmp_path / "strange.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    with ibcore.registry_snapshot():
        results = ibcore.run(path, out_dir=tmp_path / "out", quiet=True)

    def strict(text: str) -> Any:
        def refuse(constant: str) -> None:
            raise AssertionError(f"{constant} in a JSON file")

        return json.loads(text, parse_constant=refuse)

    lines = [strict(line) for line in (results.run_dir / "metrics.jsonl").read_text().splitlines()]
    (test,) = [line for line in lines if line["split"] == "test"]
    assert test["weird"] is None and test["huge"] is None
    assert test["non_finite"] == {"weird": "nan", "huge": "inf"}
    payload = strict((results.run_dir / "results.json").read_text())
    assert payload["last"][0]["weird"] is None and payload["last"][0]["non_finite"] == {"weird": "nan", "huge": "inf"}
    assert math.isfinite(payload["last"][0]["acc1"])
