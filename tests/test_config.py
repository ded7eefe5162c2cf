"""The experiment config: every mistake reported at once with its path, safe YAML, overrides, plugins."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import Field

import ibcore
from ibcore import BuildContext, ConfigError, Params, PerClass, register_loss, registry_snapshot
from ibcore.config import experiment_json_schema

# DESIGN.md §5, the public example of the format, with `plugins:` left out (tested on its own below).
DESIGN_CONFIG = """\
seed: 0
data:
  dataset: {name: cifar10_lt, params: {root: data/cifar10, imbalance_ratio: 100}}
  batch_size: 128
trainer: {epochs: 200, device: auto, precision: fp32, eval_every: 10, out_dir: runs}
defaults:                             # every run inherits these unless it overrides them
  backbone: {name: resnet32}
  optimizer: {name: sgd, params: {lr: 0.1, momentum: 0.9, weight_decay: 2.0e-4,
              warmup_epochs: 5, milestones: [160, 180], gamma: 0.01}}
runs:
  - name: ce
    loss: {name: cross_entropy}
  - name: cb_focal
    loss: {name: focal, params: {gamma: 1.0, class_weights: {name: effective_number, beta: 0.9999}}}
  - name: ldam_drw
    loss: {name: ldam, params: {max_m: 0.5, s: 30}}
    stages: [{from_epoch: 160, loss: {name: ldam, params: {class_weights: {name: effective_number, beta: 0.9999}}}}]
  - name: cb_sampling
    sampler: {name: class_balanced}
    loss: {name: cross_entropy}
evaluators: [{name: accuracy}, {name: shot_accuracy}, {name: ece}]
"""

# A small valid config on the lightest built-ins; tests edit copies of it.
SMALL_CONFIG = """\
data:
  dataset: {name: mnist_lt}
trainer: {epochs: 10}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: 0.1, momentum: 0.9}}
runs:
  - name: ce
    loss: {name: cross_entropy}
  - name: focal
    loss: {name: focal, params: {gamma: 1.0}}
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """``write(text, name="exp.yaml")`` puts a config file in a temporary folder and returns its path."""

    def _write(text: str | bytes, name: str = "exp.yaml") -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


def issues_of(source: Any, overrides: list[str] | None = None) -> list[tuple[str, str]]:
    return [(issue.path, issue.message) for issue in ibcore.validate(source, overrides=overrides)]


def only_issue(source: Any) -> str:
    [(path, message)] = issues_of(source)
    assert path == ""  # a file-level problem
    return message


# --------------------------------------------------------------------------------------------
# Valid configs


def test_the_design_config_validates(write: Callable[..., Path]) -> None:
    path = write(DESIGN_CONFIG)
    assert issues_of(path) == []
    experiment = ibcore.load_experiment(path)
    assert [run.name for run in experiment.runs] == ["ce", "cb_focal", "ldam_drw", "cb_sampling"]
    # defaults are merged into every run that does not set its own
    assert {run.backbone.name for run in experiment.runs} == {"resnet32"}  # type: ignore[union-attr]
    assert all(
        run.optimizer is not None and run.optimizer.params["milestones"] == [160, 180] for run in experiment.runs
    )
    assert experiment.runs[0].sampler is None  # not required: the trainer's default
    [stage] = experiment.runs[2].stages
    assert stage.from_epoch == 160 and stage.loss is not None and stage.loss.name == "ldam"
    assert [e.name for e in experiment.evaluators] == ["accuracy", "shot_accuracy", "ece"]


def test_defaults_of_the_format(write: Callable[..., Path]) -> None:
    experiment = ibcore.load_experiment(write(SMALL_CONFIG))
    assert experiment.seed == 0
    assert experiment.plugins == []
    assert experiment.data.batch_size == 128 and experiment.data.num_workers == 0
    assert experiment.trainer.device == "auto" and experiment.trainer.precision == "fp32"
    assert experiment.trainer.eval_every == 10 and experiment.trainer.out_dir == "runs"
    assert [e.name for e in experiment.evaluators] == ["accuracy", "shot_accuracy"]


def test_a_run_setting_a_component_replaces_the_default_whole(write: Callable[..., Path]) -> None:
    path = write(
        SMALL_CONFIG
        + """\
  - name: slow
    loss: {name: cross_entropy}
    optimizer: {name: sgd, params: {lr: 0.01}}
"""
    )
    experiment = ibcore.load_experiment(path)
    assert experiment.run("ce").optimizer.params == {"lr": 0.1, "momentum": 0.9}  # type: ignore[union-attr]
    assert experiment.run("slow").optimizer.params == {"lr": 0.01}  # type: ignore[union-attr]  # no deep merge


def test_a_mapping_validates_like_a_file() -> None:
    import yaml

    data = yaml.safe_load(SMALL_CONFIG)
    assert issues_of(data) == []
    data["runs"][0]["loss"]["params"] = {"label_smoothing": 2.0}
    [(path, message)] = issues_of(data)
    assert path == "runs[0].loss.params.label_smoothing"


# --------------------------------------------------------------------------------------------
# Every mistake at once, each with its path

FIVE_MISTAKES = """\
data:
  dataset: {name: mnist_lt}
trainer: {epochs: 10%(trainer_typo)s}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: 0.1}}
runs:
  - name: ce
    loss: {name: cross_entrpy}                          # 1. unknown loss name
  - name: focal
    loss: {name: focal, params: {gamma: high%(param_typo)s}} # 2. bad param type
  - name: drw
    loss: {name: ldam}
    stages: [{from_epoch: 12, loss: {name: ldam}}]      # 4. stage after the last epoch (0..9)
  - name: ce                                            # 5. duplicate run name
    loss: {name: cross_entropy}
"""


@pytest.mark.parametrize(
    ("typo", "typo_path", "meant"),
    [
        pytest.param("param", "runs[1].loss.params.class_weigths", "class_weights", id="unknown-key-in-params"),
        pytest.param(
            "trainer",
            "trainer.eval_evry",
            "eval_every",
            id="unknown-key-in-schema",
            marks=(),
        ),
    ],
)
def test_five_mistakes_give_five_issues_with_their_paths(
    write: Callable[..., Path], typo: str, typo_path: str, meant: str
) -> None:
    text = FIVE_MISTAKES % {
        "trainer_typo": ", eval_evry: 5" if typo == "trainer" else "",
        "param_typo": ", class_weigths: null" if typo == "param" else "",
    }
    issues = dict(issues_of(write(text)))
    assert sorted(issues) == sorted(
        [
            "runs[0].loss.name",
            "runs[1].loss.params.gamma",
            typo_path,
            "runs[2].stages[0].from_epoch",
            "runs[3].name",
        ]
    )
    assert issues["runs[0].loss.name"].startswith("Unknown loss 'cross_entrpy'. Did you mean: cross_entropy")
    assert "valid number" in issues["runs[1].loss.params.gamma"] and "'high'" in issues["runs[1].loss.params.gamma"]
    assert f"did you mean {meant!r}" in issues[typo_path]
    assert "12 is not before trainer.epochs=10" in issues["runs[2].stages[0].from_epoch"]
    assert issues["runs[3].name"] == "duplicate run name 'ce' (also runs[0])"


def test_config_error_renders_every_issue_with_the_file(write: Callable[..., Path]) -> None:
    path = write(SMALL_CONFIG.replace("gamma: 1.0", "gamma: -1.0").replace("name: ce", "name: has space"))
    with pytest.raises(ConfigError) as caught:
        ibcore.load_experiment(path)
    text = str(caught.value)
    assert text.startswith(f"2 errors in {path}:")
    assert "runs[1].loss.params.gamma: Input should be greater than or equal to 0" in text
    assert "runs[0].name: String should match pattern" in text


def test_missing_backbone_with_no_default(write: Callable[..., Path]) -> None:
    path = write(SMALL_CONFIG.replace("  backbone: {name: small_cnn}\n", ""))
    assert issues_of(path) == [
        ("runs[0].backbone", "required: set it here or under defaults.backbone"),
        ("runs[1].backbone", "required: set it here or under defaults.backbone"),
    ]


def test_missing_sections_and_empty_runs(write: Callable[..., Path]) -> None:
    assert dict(issues_of(write("seed: 1\n"))) == {
        "data": "required field is missing",
        "runs": "required field is missing",
    }
    [(path, message)] = issues_of(write(SMALL_CONFIG.split("runs:")[0] + "runs: []\n"))
    assert path == "runs" and "at least 1 item" in message


def test_stages_must_change_something_and_be_in_order(write: Callable[..., Path]) -> None:
    path = write(
        SMALL_CONFIG
        + """\
    stages:
      - {from_epoch: 5, loss: {name: focal, params: {gamma: 2.0}}}
      - {from_epoch: 3, sampler: {name: class_balanced}}
      - {from_epoch: 8}
"""
    )
    assert issues_of(path) == [
        ("runs[1].stages[1].from_epoch", "stages must be in increasing from_epoch order"),
        (
            "runs[1].stages[2]",
            "the stage changes nothing; set loss, sampler, mixer, optimizer, step, retrain_classifier, "
            "scale_classifier or train_classifier",
        ),
    ]


def test_a_run_retrains_its_classifier_one_way(write: Callable[..., Path]) -> None:
    both = "a run re-trains its classifier one way: retrain_classifier (cRT, a new classifier) or"
    stages = "    stages:\n"
    path = write(SMALL_CONFIG + stages + "      - {from_epoch: 5, retrain_classifier: true, scale_classifier: true}\n")
    [(where, message)] = issues_of(path)
    assert where == "runs[1].stages[0].scale_classifier" and message.startswith(both)
    lws = "      - {from_epoch: 3, scale_classifier: true}\n"
    crt = "      - {from_epoch: 5, retrain_classifier: true}\n"
    path = write(SMALL_CONFIG + stages + lws + crt)
    [(where, message)] = issues_of(path)
    assert where == "runs[1].stages[1].retrain_classifier" and message.startswith(both)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_shortening_a_recipe_below_its_stages_says_what_is_wrong_and_what_to_do() -> None:
    # The newcomer's first try: the LDAM-DRW recipe (a stage from epoch 160) for one epoch.
    recipe = EXAMPLES / "cifar10_lt_ldam_drw.yaml"
    issues = dict(issues_of(recipe, ["trainer.epochs=1"]))
    message = issues["runs[5].stages[0].from_epoch"]
    assert message.startswith("160 is never reached: a stage starts after at least 1 epoch and trainer.epochs=1 ")
    assert "so no stage can run" in message
    assert "keep trainer.epochs and run `ib run` with --smoke" in message and "remove the stage" in message
    assert "outside" not in message and "0..0" not in message and "epoch 0" not in message
    message = dict(issues_of(recipe, ["trainer.epochs=100"]))["runs[5].stages[0].from_epoch"]
    assert message.startswith(
        "160 is not before trainer.epochs=100: a stage starts after 1 to 99 completed epochs (from_epoch: N starts "
        "it after N epochs)."
    )
    assert "--smoke" in message and "move the stage (from_epoch below 100) or train longer" in message


@pytest.mark.parametrize(("start", "epochs", "valid"), [(9, 10, True), (10, 10, False), (1, 2, True), (1, 1, False)])
def test_a_stage_may_start_at_any_epoch_from_1_to_the_last(
    write: Callable[..., Path], start: int, epochs: int, valid: bool
) -> None:
    stage = f"runs.focal.stages=[{{from_epoch: {start}, loss: {{name: cross_entropy}}}}]"
    issues = issues_of(write(SMALL_CONFIG), [stage, f"trainer.epochs={epochs}"])
    assert (issues == []) is valid, issues


# --------------------------------------------------------------------------------------------
# Reading the file safely


def test_yaml_that_is_not_a_mapping(write: Callable[..., Path]) -> None:
    assert only_issue(write("- a\n- b\n")) == "the top level must be a mapping (key: value), not a list"
    assert "not a str" in only_issue(write("just text\n"))


def test_invalid_yaml_names_the_line(write: Callable[..., Path]) -> None:
    message = only_issue(write("data:\n  dataset: {name: mnist_lt\nruns: []\n"))
    assert message.startswith("not valid YAML (line 3, column 5)")


def test_non_utf8_bytes(write: Callable[..., Path]) -> None:
    assert only_issue(write(b"seed: 0\n# caf\xe9\n")) == "config file is not UTF-8 text (byte 13 is invalid)"


def test_empty_file(write: Callable[..., Path]) -> None:
    assert only_issue(write("")) == "config file is empty; expected a mapping with data and runs"
    assert only_issue(write("# only a comment\n")) == "config file is empty; expected a mapping with data and runs"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert only_issue(tmp_path / "nope.yaml") == "config file does not exist"
    assert only_issue(tmp_path) == "config file is a directory"


@pytest.mark.parametrize(
    "tagged",
    [
        "seed: !!python/object/apply:os.system ['echo pwned']\n",
        "seed: !!python/object:collections.OrderedDict {}\n",
        "seed: !!python/name:os.system\n",
    ],
)
def test_python_object_tags_are_refused(write: Callable[..., Path], tagged: str) -> None:
    message = only_issue(write(tagged))
    assert "YAML tags that construct Python objects are not allowed" in message


def _alias_bomb(levels: int) -> str:
    """A 'billion laughs' document: each level repeats the previous one nine times through aliases."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused(write: Callable[..., Path]) -> None:
    # Six levels expand to 9**6 = 531,441 strings, over the 200,000-value limit (the memory-capped bomb tests in
    # tests/robustness/test_config_fuzz.py show the expansion is never built).
    path = write(_alias_bomb(6))
    assert "alias bomb" in only_issue(path)


# --------------------------------------------------------------------------------------------
# Overrides (`--set`)


def test_overrides_set_values_by_path_and_by_run_name(write: Callable[..., Path]) -> None:
    path = write(SMALL_CONFIG)
    experiment = ibcore.load_experiment(
        path,
        overrides=[
            "trainer.epochs=5",
            "runs.focal.loss.params.gamma=2",
            "runs[0].sampler={name: class_balanced, params: {q: 0.5}}",
            "defaults.optimizer.params.milestones=[3, 4]",
            "data.batch_size=32",
        ],
    )
    assert experiment.trainer.epochs == 5
    assert experiment.run("focal").loss.params == {"gamma": 2}  # type: ignore[union-attr]
    assert experiment.run("ce").sampler.params == {"q": 0.5}  # type: ignore[union-attr]
    assert experiment.run("ce").optimizer.params["milestones"] == [3, 4]  # type: ignore[union-attr]
    assert experiment.data.batch_size == 32
    assert ibcore.load_experiment(path).trainer.epochs == 10  # the file itself is unchanged


def test_an_override_is_validated_like_the_file(write: Callable[..., Path]) -> None:
    path = write(SMALL_CONFIG)
    # cross_entropy has no gamma: the override lands and the issue points at it
    [(where, message)] = issues_of(path, ["runs.ce.loss.params.gamma=2"])
    assert where == "runs[0].loss.params.gamma" and message.startswith("unknown key 'gamma'")
    [(where, message)] = issues_of(path, ["trainer.epochs=abc"])
    assert where == "trainer.epochs" and "valid integer" in message
    # a stage beyond the new epoch count is caught
    stage = "runs.focal.stages=[{from_epoch: 8, loss: {name: cross_entropy}}]"
    assert issues_of(path, [stage]) == []
    assert [p for p, _ in issues_of(path, [stage, "trainer.epochs=5"])] == ["runs[1].stages[0].from_epoch"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runs.nope.loss.name=focal", "no run named 'nope'; runs are ['ce', 'focal']"),
        ("runs[7].loss.name=focal", "index 7 is out of range (length 2)"),
        ("trainer.epochs", "expected PATH=VALUE, e.g. trainer.epochs=5"),
        ("trainer.epochs.x=1", "cannot set 'x' inside the value 10"),
        ("trainer[0]=1", "[0] used on a mapping"),
        ("runs[x=1", "cannot parse override"),
    ],
)
def test_bad_override_paths_are_reported(write: Callable[..., Path], override: str, message: str) -> None:
    issues = issues_of(write(SMALL_CONFIG), [override])
    assert issues[0][0] == f"--set {override}"
    assert message in issues[0][1]


# --------------------------------------------------------------------------------------------
# plugins: the only way a config imports code


@pytest.fixture
def isolated_imports() -> Iterator[None]:
    """Registry and sys.modules as they were, so a plugin module imported by a config does not leak."""
    before = set(sys.modules)
    with registry_snapshot():
        yield
    for name in set(sys.modules) - before:
        if name.startswith("ibtest_"):
            del sys.modules[name]


PLUGIN_MODULE = """\
from pydantic import Field
from ibcore import BuildContext, Params, register_loss


class DoubledParams(Params):
    factor: float = Field(2.0, gt=0)


@register_loss("ibtest_doubled", DoubledParams)
def build_doubled(params: DoubledParams, context: BuildContext):
    \"\"\"A loss registered by a module that the config lists under plugins.\"\"\"
    return lambda logits, targets, sample_weight=None: params.factor
"""


def test_plugins_imports_a_module_next_to_the_config(write: Callable[..., Path], isolated_imports: None) -> None:
    write(PLUGIN_MODULE, name="ibtest_my_losses.py")
    config = "plugins: [ibtest_my_losses]\n" + SMALL_CONFIG.replace(
        "name: cross_entropy}", "name: ibtest_doubled, params: {factor: 3}}"
    )
    path = write(config)
    experiment = ibcore.load_experiment(path)
    assert experiment.run("ce").loss.name == "ibtest_doubled"  # type: ignore[union-attr]
    info = ibcore.list_components("loss", "ibtest_doubled")[0]
    assert info.provider == "local:ibtest_my_losses"
    [(where, message)] = issues_of(path, ["runs.ce.loss.params.factor=0"])
    assert where == "runs[0].loss.params.factor" and "greater than 0" in message


def test_a_plugin_that_fails_to_import_is_reported_at_its_index(
    write: Callable[..., Path], isolated_imports: None
) -> None:
    write("raise ValueError('bad plugin setup')\n", name="ibtest_broken.py")
    path = write("plugins: [ibtest_broken, ibtest_missing_module]\n" + SMALL_CONFIG)
    assert issues_of(path) == [
        ("plugins[0]", "could not import 'ibtest_broken': ValueError: bad plugin setup"),
        (
            "plugins[1]",
            f"could not import 'ibtest_missing_module': no module named 'ibtest_missing_module' in the config's "
            f"folder {path.parent.resolve()}, the working directory {Path.cwd().resolve()} or the installed packages",
        ),
    ]


def test_a_plugin_in_the_working_directory_is_found_as_python_m_would(
    write: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_imports: None
) -> None:
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "ibtest_cwd_losses.py").write_text(PLUGIN_MODULE, encoding="utf-8")
    configs = tmp_path / "configs"
    configs.mkdir()
    path = configs / "exp.yaml"
    path.write_text(
        "plugins: [ibtest_cwd_losses]\n" + SMALL_CONFIG.replace("name: cross_entropy}", "name: ibtest_doubled}"),
        encoding="utf-8",
    )
    monkeypatch.chdir(workdir)
    before = list(sys.path)
    assert ibcore.load_experiment(path).run("ce").loss.name == "ibtest_doubled"  # type: ignore[union-attr]
    assert sys.path == before  # the search path is changed only while the plugins are imported


def test_a_module_in_the_config_folder_wins_over_one_in_the_working_directory(
    write: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_imports: None
) -> None:
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "ibtest_twice.py").write_text("raise RuntimeError('the working directory was searched first')\n")
    write(PLUGIN_MODULE, name="ibtest_twice.py")
    monkeypatch.chdir(workdir)
    path = write("plugins: [ibtest_twice]\n" + SMALL_CONFIG)
    assert issues_of(path) == []


def test_no_other_key_imports_code(write: Callable[..., Path], isolated_imports: None) -> None:
    # A module that would leave a mark if anything imported it.
    write("import pathlib\npathlib.Path(__file__).with_suffix('.imported').touch()\n", name="ibtest_sentinel.py")
    path = write(
        SMALL_CONFIG.replace("name: cross_entropy", "name: 'ibtest_sentinel:build'").replace(
            "name: mnist_lt", "name: ibtest_sentinel"
        )
    )
    issues = dict(issues_of(path))
    assert "Unknown loss 'ibtest_sentinel:build'" in issues["runs[0].loss.name"]
    assert "Unknown dataset 'ibtest_sentinel'" in issues["data.dataset.name"]
    assert "ibtest_sentinel" not in sys.modules
    assert not path.with_name("ibtest_sentinel.imported").exists()


# --------------------------------------------------------------------------------------------
# Per-class lists against the class count a dataset tells without loading data


class PerClassParams(Params):
    priors: Annotated[tuple[float, ...], PerClass] | None = Field(None, description="One number per class.")


def _per_class_config(dataset: str, priors: list[float]) -> dict[str, Any]:
    return {
        "data": {"dataset": yaml.safe_load(dataset)},
        "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": {"name": "sgd"}},
        "runs": [
            {"name": "mine", "loss": {"name": "ibtest_per_class", "params": {"priors": priors}}},
            {
                "name": "drw",
                "loss": {"name": "cross_entropy"},
                "stages": [{"from_epoch": 1, "loss": {"name": "ibtest_per_class", "params": {"priors": [1.0]}}}],
            },
        ],
    }


@pytest.fixture
def per_class_loss() -> Iterator[None]:
    with registry_snapshot():
        register_loss("ibtest_per_class", PerClassParams)(lambda params, context: None)
        yield


@pytest.mark.parametrize(
    ("dataset", "classes"),
    [
        ("{name: mnist_lt}", 10),
        ("{name: cifar10_lt, params: {root: nowhere}}", 10),
        ("{name: cifar100_lt, params: {root: nowhere}}", 100),
        ("{name: array_file, params: {path: nowhere.npz, num_classes: 7}}", 7),
        ("{name: image_list, params: {root: r, train_list: a, test_list: b, num_classes: 5}}", 5),
    ],
)
def test_ib_validate_checks_per_class_lists_when_the_dataset_knows_its_classes(
    per_class_loss: None, dataset: str, classes: int
) -> None:
    name = yaml.safe_load(dataset)["name"]
    problem = f"expected {classes} values, one per class (the dataset {name!r} has {classes} classes)"
    assert issues_of(_per_class_config(dataset, [1.0, 2.0, 3.0])) == [
        ("runs[0].loss.params.priors", f"{problem}, got 3"),
        ("runs[1].stages[0].loss.params.priors", f"{problem}, got 1"),
    ]
    config = _per_class_config(dataset, [1.0] * classes)
    config["runs"].pop()
    assert issues_of(config) == []


@pytest.mark.parametrize(
    "dataset",
    ["{name: array_file, params: {path: nowhere.npz}}", "{name: image_folder, params: {root: nowhere}}"],
)
def test_per_class_lists_wait_for_the_data_when_only_the_data_knows_the_classes(
    per_class_loss: None, dataset: str
) -> None:
    assert issues_of(_per_class_config(dataset, [1.0, 2.0, 3.0])) == []  # checked when the loss is built


# --------------------------------------------------------------------------------------------
# JSON Schema


class SchemaParams(Params):
    ibtest_temperature: float = Field(1.5, gt=0, description="A parameter only this test registers.")


def test_schema_contains_the_params_of_installed_components(ib_cli: Callable[..., Any], isolated_imports: None) -> None:
    @register_loss("ibtest_schema_loss", SchemaParams)
    def build(params: SchemaParams, context: BuildContext) -> Any:
        """A loss that exists for the schema test."""
        return lambda logits, targets, sample_weight=None: 0.0

    result = ib_cli("schema")
    assert result.rc == 0
    schema = json.loads(result.out)
    assert schema == experiment_json_schema()
    losses = {choice["title"]: choice for choice in schema["$defs"]["LossSpec"]["anyOf"]}
    mine = losses["ibtest_schema_loss"]
    assert mine["description"] == "A loss that exists for the schema test."
    assert mine["properties"]["name"]["enum"] == ["ibtest_schema_loss", f"local:{__name__}:ibtest_schema_loss"]
    temperature = mine["properties"]["params"]["properties"]["ibtest_temperature"]
    assert temperature["default"] == 1.5 and temperature["exclusiveMinimum"] == 0
    assert mine["properties"]["params"]["additionalProperties"] is False
    # the installed built-ins are there too, with their own params
    assert "gamma" in losses["focal"]["properties"]["params"]["properties"]
    assert "resnet32" in {c["title"] for c in schema["$defs"]["BackboneSpec"]["anyOf"]}
    # and the fixed part of the format
    assert {"seed", "plugins", "data", "trainer", "defaults", "runs", "evaluators"} <= set(schema["properties"])


def test_params_class_in_a_plugin_are_checked_against_their_constraints() -> None:
    # A params model is a normal pydantic model: the registry uses it as-is to validate config params.
    with registry_snapshot():

        class Ranged(Params):
            p: float = Field(0.5, ge=0.0, le=1.0)

        register_loss("ibtest_ranged", Ranged)(lambda params, context: lambda z, y, sample_weight=None: params.p)
        data = {
            "data": {"dataset": {"name": "mnist_lt"}},
            "defaults": {"backbone": {"name": "small_cnn"}, "optimizer": {"name": "sgd"}},
            "runs": [{"name": "a", "loss": {"name": "ibtest_ranged", "params": {"p": 1.5}}}],
        }
        [(where, message)] = issues_of(data)
        assert where == "runs[0].loss.params.p" and "less than or equal to 1" in message
        assert ibcore.build("loss", "ibtest_ranged", {"p": 0.25}, context=BuildContext())(None, None) == 0.25


def test_the_default_evaluators_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from ibcore import register_backbone, register_dataset, register_optimizer
    from ibcore.registry import reset_discovery

    monkeypatch.setenv("IB_DISABLE_PLUGINS", "ibcore")  # no built-in evaluators installed
    with registry_snapshot():
        reset_discovery()
        for register in (register_dataset, register_backbone, register_optimizer, register_loss):
            register("ibtest_any")(lambda params, context: None)
        spec = {"name": "ibtest_any"}
        data = {"data": {"dataset": spec}, "runs": [{"name": "a", "backbone": spec, "loss": spec, "optimizer": spec}]}
        assert issues_of({**data, "evaluators": []}) == []
        issues = issues_of(data)
        assert any(path.startswith("evaluators") and "accuracy" in message for path, message in issues), issues
