"""Round 2 of the adversarial pass (issue 14): configs and the command line.

Each test shows one way a user or a file could still get a traceback, a silent exit or a wrong value
through the config layer or the ``ib`` command, and asserts what the user sees now: the exit code,
a message naming the config path, and no traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from _distributions import write_distribution
from _support import TINY_DATA_PLUGIN, base_config, no_traceback, tiny_config, write_module

import ibcore
from ibcore.config import experiment_json_schema, resolved_config
from ibcore.config.loading import parse_yaml
from ibcore.errors import ConfigError

Cli = Callable[..., Any]  # the ib_cli / ib_subprocess fixtures of tests/conftest.py
REPO_ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD = 300  # seconds: only so that a hung process fails the test instead of the CI job


def write_config(folder: Path, config: dict[str, Any], name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def tiny_experiment(folder: Path, **trainer: Any) -> Path:
    """The tiny synthetic experiment of ``_support`` (seconds on a CPU), its data plugin beside it."""
    write_module(folder, "ibtest_tiny_data", TINY_DATA_PLUGIN)
    return write_config(folder, tiny_config(**trainer), "tiny.yaml")


def issues_of(source: Any, overrides: list[str] | None = None) -> list[tuple[str, str]]:
    try:
        ibcore.load_experiment(source, overrides=overrides)
    except ConfigError as error:
        return [(issue.path, issue.message) for issue in error.issues]
    return []


def one_line(text: str) -> str:
    return " ".join(text.split())


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IB_") and k != "PYTHONPATH"}
    env["COLUMNS"] = "250"
    return env


def run_dir_under(folder: Path) -> Path:
    (run_dir,) = folder.iterdir()
    return run_dir


# --------------------------------------------------------------------------------------------
# 3. Plugin code that calls sys.exit() while it is imported


def test_a_plugins_module_that_calls_sys_exit_is_a_plugin_failure(
    ib_cli: Cli, tmp_path: Path, isolated_plugins: None
) -> None:
    write_module(tmp_path, "ibtest_exits", "import sys\nsys.exit(0)\n")
    config = base_config()
    config["plugins"] = ["ibtest_exits"]
    path = write_config(tmp_path, config)

    validated = ib_cli("validate", str(path))  # was: exit 0, nothing printed
    assert validated.rc == 1 and no_traceback(validated.output), validated.output
    assert f"1 error in {path}" in validated.output
    assert "sys.exit(0)" in validated.line_with("plugins[0]")

    ran = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))  # was: exit 0, nothing trained
    assert ran.rc == 1 and no_traceback(ran.output) and "plugins[0]" in ran.output
    assert not (tmp_path / "out").exists()

    for command in (["list", "losses"], ["plugins"], ["schema"]):  # was: exit 0, nothing printed
        shown = ib_cli(*command, "--config", str(path))
        assert shown.rc == 1 and no_traceback(shown.output) and "sys.exit(0)" in shown.output, command


EXITING_LOSSES = """\
import sys

from ibcore import NoParams, register_loss


class _ExitingLoss:
    def __call__(self, logits, targets, sample_weight=None):
        sys.exit(5)


@register_loss("ibtest_exit_at_build", NoParams)
def build_exit(params, context):
    \"\"\"Calls sys.exit while being built.\"\"\"
    sys.exit(0)


@register_loss("ibtest_exit_in_step", NoParams)
def build_step(params, context):
    \"\"\"Calls sys.exit at its first step.\"\"\"
    return _ExitingLoss()
"""


@pytest.mark.parametrize(
    ("loss", "shown"), [("ibtest_exit_at_build", "sys.exit(0)"), ("ibtest_exit_in_step", "sys.exit(5)")]
)
def test_plugin_code_that_calls_sys_exit_while_ib_run_trains_is_an_error(
    ib_cli: Cli, tmp_path: Path, isolated_plugins: None, loss: str, shown: str
) -> None:
    write_module(tmp_path, "ibtest_exiting_losses", EXITING_LOSSES)
    path = tiny_experiment(tmp_path, epochs=1)
    config = json.loads(path.read_text(encoding="utf-8"))
    config["plugins"].append("ibtest_exiting_losses")
    config["defaults"]["loss"] = {"name": loss}
    path.write_text(json.dumps(config), encoding="utf-8")
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output  # was: exit 0 (or 5), nothing said
    assert shown in result.err


def test_an_installed_plugin_that_calls_sys_exit_is_reported_and_the_rest_works(
    ib_subprocess: Cli, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    write_distribution(
        site, "ibtest-exits", {"ibcore.losses": {"exiting_loss": "ibtest_exits_mod"}}, "import sys\nsys.exit(0)\n"
    )
    plugins = ib_subprocess(["plugins"], python_path=[site])
    assert plugins.rc == 0 and no_traceback(plugins.output), plugins.output
    assert "failed" in plugins.line_with("ibtest-exits") and "ok" in plugins.line_with("ibcore")
    assert "SystemExit: it called sys.exit(0)" in plugins.output

    listed = ib_subprocess(["list", "losses"], python_path=[site])
    assert listed.rc == 0 and "cross_entropy" in listed.out
    assert "failed to load" in listed.line_with("exiting_loss")

    schema = ib_subprocess(["schema"], python_path=[site])
    assert schema.rc == 0 and "cross_entropy" in json.dumps(json.loads(schema.out))


# --------------------------------------------------------------------------------------------
# 7. --set values are read like a config file


@pytest.mark.parametrize(
    ("override", "where", "message"),
    [
        ("runs[0].loss.name=!!binary bm9wZQ==", "runs[0].loss.name", "binary values (!!binary) are not allowed"),
        ("trainer={epochs: 1, epochs: 2}", "trainer", "duplicate key 'epochs'"),
        ("runs.ce.loss={name: focal, params: {gamma: 1, gamma: 2}}", "runs.ce.loss", "duplicate key 'gamma'"),
    ],
    ids=["binary", "duplicate-key", "duplicate-nested-key"],
)
def test_a_set_value_is_read_with_the_loader_and_limits_of_config_files(
    ib_cli: Cli, tmp_path: Path, override: str, where: str, message: str
) -> None:
    path = write_config(tmp_path, base_config())
    validated = ib_cli("validate", str(path), "--set", override)
    assert validated.rc == 1 and no_traceback(validated.output), validated.output
    assert f"in {path}" in validated.output
    assert message in validated.line_with(f"{where}: cannot parse override")

    out = tmp_path / "out"
    ran = ib_cli("run", str(path), "--quiet", "--set", override, "--out", str(out))
    assert ran.rc == 1 and no_traceback(ran.output) and message in ran.output
    assert not out.exists()  # was: a run directory, then a failure


# --------------------------------------------------------------------------------------------
# 10. `fused: on` is the boolean true for YAML 1.1


def test_on_and_off_written_bare_set_the_trainer_switches(ib_cli: Cli, tmp_path: Path) -> None:
    config = base_config()
    del config["trainer"]
    text = (
        yaml.safe_dump(config) + "trainer: {epochs: 4, device: cpu, fused: on, data_on_device: off, cuda_graphs: off}\n"
    )
    path = tmp_path / "switches.yaml"
    path.write_text(text, encoding="utf-8")

    validated = ib_cli("validate", str(path))  # was: 'Input should be auto, on or off (got True)'
    assert validated.rc == 0, validated.output
    trainer = ibcore.load_experiment(path).trainer
    assert (trainer.fused, trainer.data_on_device, trainer.cuda_graphs) == ("on", "off", "off")
    # config.yaml keeps the words: safe_dump quotes them, so they read back as text, not booleans
    saved = yaml.safe_load(yaml.safe_dump(resolved_config(ibcore.load_experiment(path))))
    assert (saved["trainer"]["fused"], saved["trainer"]["cuda_graphs"]) == ("on", "off")

    assert ibcore.load_experiment(base_config(), overrides=["trainer.fused=yes"]).trainer.fused == "on"
    # cuda_graphs has no "on": the message says what to write instead
    ((where, message),) = issues_of(base_config(), ["trainer.cuda_graphs=on"])
    assert where == "trainer.cuda_graphs" and '"auto"' in message


# --------------------------------------------------------------------------------------------
# 11. Optimizer params within sane, finite ranges


@pytest.mark.parametrize(
    ("optimizer", "param", "value"),
    [
        ("sgd", "lr", 1e308),
        ("sgd", "weight_decay", 1e5),
        ("sgd", "momentum", 1e308),
        ("sgd", "gamma", 1e300),
        ("sgd", "min_lr", 1e300),
        ("sgd", "warmup_epochs", 10**30),
        ("adam", "lr", 2e4),
        ("adam", "eps", 10.0),
        ("adamw", "weight_decay", 1e3),
    ],
)
def test_optimizer_params_out_of_sane_ranges_are_refused_at_their_path(
    optimizer: str, param: str, value: float
) -> None:
    config = base_config()
    config["defaults"]["optimizer"] = {"name": optimizer, "params": {param: value}}
    issues = issues_of(config)
    assert [where for where, _ in issues] == [f"defaults.optimizer.params.{param}"], issues


def test_ib_run_with_an_overflowing_learning_rate_stops_before_a_run_directory(ib_cli: Cli, tmp_path: Path) -> None:
    path = write_config(tmp_path, base_config())
    out = tmp_path / "out"
    result = ib_cli("run", str(path), "--quiet", "--set", "defaults.optimizer.params.lr=1e308", "--out", str(out))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert "less than or equal to 10000" in result.line_with("defaults.optimizer.params.lr")
    assert not out.exists()


def test_nan_is_refused_by_every_float_param_of_the_built_ins() -> None:
    from ibcore.registry import list_components

    accepted = []
    for info in list_components(load=True):
        if info.params is None or info.provider != "ibcore":
            continue
        for field_name, field in info.params.model_fields.items():
            if "float" not in str(field.annotation) or "list" in str(field.annotation):
                continue
            try:
                info.params.model_validate({field_name: math.nan})
            except ValueError as error:  # pydantic's ValidationError
                if field_name not in str(error):
                    accepted.append(f"{info.kind} {info.name}.{field_name}")
            else:
                accepted.append(f"{info.kind} {info.name}.{field_name}")
    assert not accepted, f"accepted NaN: {', '.join(accepted)}"


# --------------------------------------------------------------------------------------------
# 13. Text with rich markup characters is printed as written


def test_ib_schema_to_a_file_name_with_brackets_prints_it_as_written(ib_cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "o[").mkdir()
    target = tmp_path / "o[" / "]x.json"  # "o[/]x.json": "[/]" closes a style that is not open
    result = ib_cli("schema", "-o", str(target))  # was: the file written, then a MarkupError traceback
    assert result.rc == 0 and no_traceback(result.output), result.output
    assert f"wrote {target}" in result.err
    assert "$defs" in json.loads(target.read_text(encoding="utf-8"))


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "progress"])
def test_ib_run_with_brackets_in_the_output_folder(
    ib_cli: Cli, tmp_path: Path, isolated_plugins: None, quiet: bool
) -> None:
    out = tmp_path / "o[/]x"
    path = tiny_experiment(tmp_path, epochs=1)
    result = ib_cli("run", str(path), "--out", str(out), *(["--quiet"] if quiet else []))
    assert result.rc == 0 and no_traceback(result.output), result.output
    run_dir = run_dir_under(out)
    assert (run_dir / "results.json").is_file()
    assert str(run_dir) in "".join(result.out.split())  # the results table's title names it (wrapped) as written


# --------------------------------------------------------------------------------------------
# 15. A device the machine lacks is refused before the run directory exists


def _missing_devices() -> list[str]:
    import torch

    devices = []
    if not torch.backends.mps.is_available():
        devices.append("mps")
    devices.append(f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:1")
    return devices


@pytest.mark.parametrize("device", _missing_devices())
def test_a_device_this_machine_lacks_is_refused_before_the_run_directory(
    ib_cli: Cli, tmp_path: Path, isolated_plugins: None, device: str
) -> None:
    path = tiny_experiment(tmp_path)
    out = tmp_path / "out"
    result = ib_cli("run", str(path), "--quiet", "--set", f"trainer.device={device}", "--out", str(out))
    assert result.rc == 1 and no_traceback(result.output), result.output  # mps was: a traceback from torch
    message = one_line(result.err)
    assert f"trainer.device is '{device}'" in message and "available here: cpu" in message
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 16. YAML merge keys


MERGED = """\
data: {dataset: {name: mnist_lt, params: {imbalance_ratio: 50, test_per_class: 20}}, batch_size: 64}
trainer: {epochs: 4, device: cpu}
defaults:
  backbone: {name: small_cnn}
  optimizer: &sgd {name: sgd, params: &sgd_params {lr: 0.05, momentum: 0.9, milestones: [2]}}
  loss: {name: cross_entropy}
runs:
  - name: ce
  - name: slow
    optimizer:
      <<: *sgd
      params: {<<: *sgd_params, lr: 0.01}
"""


def test_merge_keys_build_on_an_anchor_and_a_written_key_wins(ib_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "merged.yaml"
    path.write_text(MERGED, encoding="utf-8")
    validated = ib_cli("validate", str(path))  # was: "YAML tags that construct Python objects are not allowed"
    assert validated.rc == 0, validated.output
    slow = ibcore.load_experiment(path).run("slow").optimizer
    assert slow is not None and slow.name == "sgd"
    assert slow.params == {"lr": 0.01, "momentum": 0.9, "milestones": [2]}

    # a key written twice is still a duplicate, merge or not; so is a second merge key
    for duplicated in ("{<<: *sgd_params, lr: 0.01, lr: 0.02}", "{<<: *sgd_params, <<: *sgd_params}"):
        path.write_text(MERGED.replace("{<<: *sgd_params, lr: 0.01}", duplicated), encoding="utf-8")
        result = ib_cli("validate", str(path))
        assert result.rc == 1 and no_traceback(result.output) and "duplicate key" in result.output


def test_merge_keys_follow_yaml_the_first_merged_mapping_wins() -> None:
    text = "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], y: 3}\nd: <<\n"
    assert parse_yaml(text, "t")["c"] == {"x": 1, "y": 3, "z": 2}
    assert parse_yaml(text, "t")["d"] == "<<"  # `<<` as a value is text
    with pytest.raises(ConfigError, match="takes a mapping or a list of mappings"):
        parse_yaml("a: &a {x: 1}\nb: {<<: [*a, 3]}\n", "t")


def test_merging_a_large_mapping_into_many_is_refused_within_the_value_limit() -> None:
    # 2,000 keys merged into 60,000 mappings: 120 million entries if built; the loader stops at the value limit
    keys = ", ".join(f"k{i}: {i}" for i in range(2000))
    text = f"a: &a {{{keys}}}\nb: [" + ", ".join(["{<<: *a}"] * 60_000) + "]\n"
    with pytest.raises(ConfigError, match="merge keys included"):
        parse_yaml(text, "t")


# --------------------------------------------------------------------------------------------
# 17. `~` in out_dir and --out


def test_a_tilde_in_the_output_folder_is_the_home_folder(
    ib_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_plugins: None
) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    path = tiny_experiment(tmp_path, epochs=1, out_dir="~/runs")
    result = ib_cli("run", str(path), "--quiet", "--smoke", "1")
    assert result.rc == 0 and no_traceback(result.output), result.output
    assert (run_dir_under(home / "runs") / "results.json").is_file()
    result = ib_cli("run", str(path), "--quiet", "--smoke", "1", "--out", "~/other")
    assert result.rc == 0 and (run_dir_under(home / "other") / "results.json").is_file()
    assert not (work / "~").exists()  # was: a folder literally named "~" in the working directory


# --------------------------------------------------------------------------------------------
# 18. ib schema -o into a missing folder, or onto a folder


def test_ib_schema_into_a_missing_folder_or_onto_a_folder_is_a_clear_error(ib_cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "ib.schema.json"
    result = ib_cli("schema", "-o", str(missing))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert f"the folder {missing.parent} does not exist" in one_line(result.err)
    assert not missing.parent.exists()  # was: the folder made silently

    result = ib_cli("schema", "-o", str(tmp_path))
    assert result.rc == 1 and no_traceback(result.output)
    assert "is a folder; name a file in it" in one_line(result.err)


# --------------------------------------------------------------------------------------------
# 19. The JSON Schema agrees with `ib validate`


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _allows_null(schema: dict[str, Any], root: dict[str, Any]) -> bool:
    schema = _resolve(schema, root)
    types = schema.get("type")
    if types == "null" or (isinstance(types, list) and "null" in types):
        return True
    return any(_allows_null(option, root) for key in ("anyOf", "oneOf") for option in schema.get(key, []))


def test_params_null_is_allowed_by_the_json_schema_as_by_ib_validate() -> None:
    config = base_config()
    config["runs"][0]["loss"] = {"name": "cross_entropy", "params": None}
    assert issues_of(config) == []  # `params: null` is `{}`

    schema = experiment_json_schema()
    checked = 0
    for name, definition in schema["$defs"].items():
        if not name.endswith("Spec"):
            continue
        for choice in definition.get("anyOf", [definition]):
            assert _allows_null(choice["properties"]["params"], schema), (name, choice.get("title"))
            checked += 1
    assert checked > 40  # every installed component of every kind
    raw = ibcore.config.Experiment.model_json_schema()
    assert _allows_null(raw["$defs"]["LossSpec"]["properties"]["params"], raw)  # without components too


def test_a_reference_on_a_posthoc_adjustment_is_allowed_by_the_json_schema() -> None:
    schema = experiment_json_schema()
    for choice in schema["$defs"]["AdjustmentSpec"]["anyOf"]:
        assert "reference" in choice["properties"], choice["title"]


SHIPPED_EXAMPLES = sorted((REPO_ROOT / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("example", SHIPPED_EXAMPLES, ids=[str(p.relative_to(REPO_ROOT)) for p in SHIPPED_EXAMPLES])
def test_every_shipped_example_validates_against_the_json_schema(example: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from ibcore.config.loading import compose_config_file

    data = compose_config_file(example).data
    jsonschema.validate(data, experiment_json_schema())


# --------------------------------------------------------------------------------------------
# 21. A plugin that prints while imported


def test_a_plugin_that_prints_while_imported_leaves_stdout_to_the_json_and_the_yaml(
    ib_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_plugins: None
) -> None:
    monkeypatch.chdir(tmp_path)
    write_module(tmp_path, "ibtest_noisy", "print('hello from a plugin')\n")
    result = ib_cli("schema", "--plugins", "ibtest_noisy")
    assert result.rc == 0, result.output
    assert "$defs" in json.loads(result.out)  # was: "hello from a plugin" before the JSON
    assert "hello from a plugin" in result.err

    write_module(tmp_path, "ibtest_noisy_too", "print('hello again')\n")
    config = base_config()
    config["plugins"] = ["ibtest_noisy_too"]
    path = write_config(tmp_path, config)
    result = ib_cli("validate", str(path), "--print")
    assert result.rc == 0, result.output
    assert yaml.safe_load(result.out)["plugins"] == ["ibtest_noisy_too"]
    assert "hello again" in result.err


# --------------------------------------------------------------------------------------------
# 22. A boolean is not a number


BOOLEANS = """\
seeds: [0, true]
data:
  dataset: {name: mnist_lt, params: {imbalance_ratio: 50, test_per_class: 20}}
  batch_size: true
trainer: {epochs: yes, device: cpu, compile: yes}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: true, milestones: [1, on]}}
  loss: {name: cross_entropy, params: {check_targets: true}}
runs:
  - name: ce
  - name: focal
    loss: {name: focal, params: {gamma: on, class_weights: [1, 1, 1, 1, 1, 1, 1, 1, 1, true]}}
"""


def test_a_boolean_is_not_a_number(ib_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "booleans.yaml"
    path.write_text(BOOLEANS, encoding="utf-8")
    result = ib_cli("validate", str(path))  # was: valid, every `true` read as 1
    assert result.rc == 1 and no_traceback(result.output), result.output
    for where in (
        "seeds",
        "data.batch_size",
        "trainer.epochs",
        "defaults.optimizer.params.lr",
        "defaults.optimizer.params.milestones",
        "runs[1].loss.params.gamma",
        "runs[1].loss.params.class_weights",
    ):
        assert "a boolean is not a number" in result.line_with(f"  {where}: "), where
    assert f"7 errors in {path}" in result.output  # compile: yes and check_targets: true are booleans indeed


# --------------------------------------------------------------------------------------------
# 23. A full disk at start leaves nothing behind


def test_a_full_disk_at_start_leaves_no_run_directory(
    ib_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_plugins: None
) -> None:
    path = tiny_experiment(tmp_path)
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: Any) -> int:
        if self.name == ".write-test":  # the probe of a new run directory
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "out" / "nested"
    result = ib_cli("run", str(path), "--quiet", "--out", str(out))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert f"cannot write the run directory under {out}: {os.strerror(errno.ENOSPC)}" in one_line(result.err)
    assert not (tmp_path / "out").exists()  # was: out/nested/tiny-<stamp>/, empty


# --------------------------------------------------------------------------------------------
# (a) `ib run ... | head`: the reader of stdout goes away


def test_a_closed_stdout_does_not_stop_training(tmp_path: Path) -> None:
    path = tiny_experiment(tmp_path)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "ibcore.cli", "run", str(path), "--out", str(out)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # gone before the first line: every write to stdout is a broken pipe
    process.stdout = None
    _, err = process.communicate(timeout=HANG_GUARD)
    errors = err.decode(errors="replace")
    assert process.returncode == 0 and no_traceback(errors), errors  # was: exit 1 at the first log line
    run_dir = run_dir_under(out)
    assert (run_dir / "results.json").is_file()
    assert "epoch 2/2" in (run_dir / "train.log").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# (b) SIGTERM (a Slurm time limit) and SIGHUP stop training like Ctrl-C


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_termination_signal_stops_training_like_ctrl_c(tmp_path: Path, name: str, code: int) -> None:
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    path = tiny_experiment(tmp_path, epochs=100_000, eval_every=100_000, checkpoint_every=100_000)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "ibcore.cli", "run", str(path), "--out", str(out), "--quiet"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not (out.is_dir() and any((d / "train.log").is_file() for d in out.iterdir())):
            assert process.poll() is None, process.communicate()[1].decode(errors="replace")
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        process.send_signal(getattr(signal, name))
        _, err = process.communicate(timeout=HANG_GUARD)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = one_line(err.decode(errors="replace"))
    assert process.returncode == code and no_traceback(errors), errors  # was: killed, -15 / -1
    run_dir = run_dir_under(out)
    assert f"interrupted by {name}. To continue, run: ib resume {run_dir}" in errors
    last = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()[-1]
    assert f"interrupted by {name}. To continue, run: ib resume {run_dir}" in last
