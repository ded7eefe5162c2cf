"""The shipped example configs: each one validates, the quickstart covers the required methods, and the
CIFAR recipes keep the published LDAM-DRW schedule their comments quote numbers for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ibcore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(
    path
    for pattern in ("*.yaml", "*.yml")
    for path in EXAMPLES.rglob(pattern)
    if "plugin-package" not in path.relative_to(EXAMPLES).parts
)


def test_the_expected_examples_are_found() -> None:
    # Guards the glob: a renamed folder must not make the validation test below pass on nothing.
    names = {path.name for path in CONFIGS}
    assert {"quickstart.yaml", "cifar10_lt_ldam_drw.yaml", "cifar100_lt_ldam_drw.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(EXAMPLES)))
def test_every_example_config_is_valid(path: Path) -> None:
    # Validation reads no data, so the CIFAR recipes validate without the CIFAR files.
    assert ibcore.validate(path) == []


# -- the quickstart covers the methods the project promises ------------------------------------


def _weighted(params: dict[str, Any]) -> bool:
    weights = params.get("class_weights")
    return weights is not None and not (isinstance(weights, dict) and weights.get("name") == "none")


def _plain_ce(run: Any) -> bool:
    return (
        run.loss.name == "cross_entropy"
        and not _weighted(run.loss.params)
        and (run.sampler is None or run.sampler.name == "instance")
        and run.mixer is None
        and not run.stages
    )


def _class_balanced_loss(run: Any) -> bool:
    return _weighted(run.loss.params)


def _ldam_with_drw(run: Any) -> bool:
    return run.loss.name == "ldam" and any(
        stage.loss is not None and stage.loss.name == "ldam" and _weighted(stage.loss.params) for stage in run.stages
    )


def _prior_correction(run: Any) -> bool:
    """Balanced Softmax or logit adjustment, as a loss or as a post-hoc adjustment."""
    return run.loss.name in {"balanced_softmax", "logit_adjusted"} or any(
        spec.name == "posthoc_logit_adjustment" for spec in run.posthoc
    )


def _resampling(run: Any) -> bool:
    return run.sampler is not None and run.sampler.name != "instance"


def _mixing(run: Any) -> bool:
    return run.mixer is not None


@pytest.mark.parametrize(
    "method",
    [_plain_ce, _class_balanced_loss, _ldam_with_drw, _prior_correction, _resampling, _mixing],
    ids=lambda method: method.__name__.strip("_"),
)
def test_the_quickstart_covers_each_required_method(method: Any) -> None:
    experiment = ibcore.load_experiment(EXAMPLES / "quickstart.yaml")  # defaults merged into the runs
    covering = [run.name for run in experiment.runs if method(run)]
    assert covering, f"no run of examples/quickstart.yaml is {method.__name__.strip('_')}"


def test_the_quickstart_uses_the_embedded_data() -> None:
    # It must run offline, on any machine, in about a minute.
    experiment = ibcore.load_experiment(EXAMPLES / "quickstart.yaml")
    assert experiment.data.dataset.name == "mnist_lt"
    assert experiment.trainer.device == "auto"


# -- the CIFAR recipes keep the LDAM-DRW schedule (Cao et al., NeurIPS 2019, kaidic/LDAM-DRW cifar_train.py) ----


@pytest.mark.parametrize(
    ("file", "dataset", "root"),
    [
        ("cifar10_lt_ldam_drw.yaml", "cifar10_lt", "data/cifar10"),
        ("cifar100_lt_ldam_drw.yaml", "cifar100_lt", "data/cifar100"),
    ],
)
def test_cifar_recipes_follow_the_ldam_drw_schedule(file: str, dataset: str, root: str) -> None:
    experiment = ibcore.load_experiment(EXAMPLES / file)
    spec = experiment.data.dataset
    assert spec.name == dataset
    # The exact subset LDAM-DRW trains on: imbalance 100, exponential profile, numpy seed 0.
    assert spec.params == {
        "root": root,
        "imbalance_ratio": 100,
        "imbalance_type": "exp",
        "subset_method": "cao",
        "subset_seed": 0,
    }
    assert experiment.data.batch_size == 128
    assert experiment.trainer.epochs == 200
    runs = {run.name: run for run in experiment.runs}
    for run in runs.values():
        assert run.backbone.name == "resnet32"
        # The official SGD schedule: 5 warm-up epochs, lr x 0.01 at epochs 160 and 180.
        assert run.optimizer.name == "sgd"
        assert run.optimizer.params == {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 2.0e-4,
            "warmup_epochs": 5,
            "milestones": [160, 180],
            "gamma": 0.01,
        }
    assert {"ce", "focal", "ldam", "ldam_drw", "cb_focal", "balanced_softmax", "crt"} <= runs.keys()
    # LDAM uses the official code's normed classifier, margins 0.5 and scale 30, with and without DRW.
    for name in ("ldam", "ldam_drw"):
        assert runs[name].backbone.params == {"classifier": "cosine"}
        assert runs[name].loss.params == {"max_m": 0.5, "s": 30}
    (drw,) = runs["ldam_drw"].stages
    assert drw.from_epoch == 160
    assert drw.loss is not None and drw.loss.params == {
        "max_m": 0.5,
        "s": 30,
        "class_weights": {"name": "effective_number", "beta": 0.9999},
    }
    # The focal baseline is LDAM-DRW's softmax focal loss with gamma 1.
    assert runs["focal"].loss.params == {"variant": "softmax", "gamma": 1.0}
    # cRT re-trains the classifier with class-balanced sampling and its own optimizer.
    (crt,) = runs["crt"].stages
    assert crt.retrain_classifier and crt.sampler is not None and crt.sampler.name == "class_balanced"
    assert crt.optimizer is not None and crt.from_epoch < experiment.trainer.epochs
    (lws,) = runs["lws"].stages  # the same stage, keeping the classifier and learning a scale per class
    assert lws.scale_classifier and not lws.retrain_classifier and lws.from_epoch == crt.from_epoch
    assert lws.optimizer is not None and lws.optimizer.params["weight_decay"] == 0.0


# -- docs/notebook.md: its code runs as written -------------------------------------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"


def test_the_notebook_page_runs_and_plots_accuracy_over_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ```python block of docs/notebook.md, in order, in one namespace: 2 epochs on the CPU."""
    import re

    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = re.findall(r"```python\n(.*?)```", NOTEBOOK.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 3
    real_run = ibcore.run

    def short_run(config: Any, **kwargs: Any) -> Any:
        overrides = ["trainer.epochs=2", "trainer.device=cpu"]
        return real_run(config, overrides=overrides, **kwargs)

    monkeypatch.setattr(ibcore, "run", short_run)
    monkeypatch.chdir(tmp_path)  # out_dir "runs" and accuracy.png land here
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    results = namespace["results"]
    assert results.run_dir.resolve().parent == (tmp_path / "runs").resolve()
    assert (tmp_path / "accuracy.png").is_file()
    # quiet: only what the page itself prints
    assert out.splitlines() == [f"{m['run']} {round(m['metrics']['few_acc']['mean'], 2)}" for m in results.summary]
    # the figure: one curve per run, at epochs 1 and 2
    axes = namespace["ax"]
    assert [line.get_label() for line in axes.get_lines()] == ["ce", "balanced_softmax", "cb_sampling"]
    for line, run in zip(axes.get_lines(), results.runs, strict=True):
        assert list(line.get_xdata()) == [1, 2]
        assert list(line.get_ydata()) == [m["acc1"] for m in results.metrics(run)]
    assert axes.get_ylabel() == "acc@1 (%)"
    assert namespace["final"]["epoch"] == 2 and namespace["final"]["acc1"] == results.row("ce")["acc1"]
    plt.close("all")
