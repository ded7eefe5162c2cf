"""The ``ib`` command as a user types it: versions, help, listing, validation exit codes, schema export.

Most tests call ``ibcore.cli.main`` in this process (fast); the console-script test starts the real
``ib`` next to the interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ibcore
from ibcore import BuildContext, Params, register_loss, registry_snapshot
from ibcore.cli import build_parser

VALID = """\
data:
  dataset: {name: mnist_lt}
trainer: {epochs: 4}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: 0.1}}
runs:
  - name: ce
    loss: {name: cross_entropy}
  - name: focal
    loss: {name: focal, params: {gamma: 2.0}}
"""

INVALID = """\
data:
  dataset: {name: mnist_lt}
trainer: {epochs: 4}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: -0.1}}
runs:
  - name: ce
    loss: {name: cross_entropy}
  - name: focal
    loss: {name: focall}
"""


@pytest.fixture
def config(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(text: str, name: str = "exp.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


SUBCOMMANDS = ["list", "plugins", "validate", "schema", "run", "resume", "report"]


def test_every_subcommand_is_covered_here() -> None:
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)  # type: ignore[attr-defined]


def test_version(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("--version")
    assert result.rc == 0
    assert result.out.strip() == f"ibcore {ibcore.__version__}"


def test_no_command_prints_help(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli()
    assert result.rc == 0
    assert result.out.startswith("usage: ib")
    for command in SUBCOMMANDS:
        assert command in result.out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(ib_cli: Callable[..., Any], command: str) -> None:
    result = ib_cli(command, "--help")
    assert result.rc == 0
    assert result.out.startswith(f"usage: ib {command}")
    assert "-h, --help" in result.out


def test_usage_errors_exit_with_2(ib_cli: Callable[..., Any]) -> None:
    assert ib_cli("frobnicate").rc == 2
    result = ib_cli("list", "gizmos")
    assert result.rc == 2 and "invalid choice: 'gizmos'" in result.err
    assert ib_cli("validate").rc == 2  # at least one CONFIG


# --------------------------------------------------------------------------------------------
# ib list


def test_list_losses(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("list", "losses")
    assert result.rc == 0
    assert result.out.lstrip().startswith("losses (")
    row = result.line_with("cross_entropy ")
    assert "ibcore 0.1.0" in row and "Softmax cross-entropy" in row
    assert "class_balanced" not in result.out  # a sampler: other kinds are not listed
    assert ib_cli("list", "loss").out == result.out  # singular and plural both work


def test_list_backbones_with_a_pattern(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("list", "backbones", "resnet*")
    assert result.rc == 0
    assert "resnet32" in result.out and "resnet110" in result.out
    assert "small_cnn" not in result.out and "torchvision" not in result.out


def test_list_with_a_pattern_matching_nothing_says_so(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("list", "losses", "no_such_*")
    assert result.rc == 0
    assert "losses (0)" in result.out and "no losses installed" in result.out


def test_list_everything_shows_every_kind(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("list")
    assert result.rc == 0
    for plural in ("datasets", "samplers", "losses", "backbones", "optimizers", "evaluators", "mixers", "adjustments"):
        assert f"{plural} (" in result.out


def test_list_shows_components_registered_in_this_process(ib_cli: Callable[..., Any]) -> None:
    class NoisyParams(Params):
        level: float = 0.1

    with registry_snapshot():

        @register_loss("ibtest_cli_loss", NoisyParams, citation="Doe et al., Venue 2024, 'Noise'")
        def build(params: NoisyParams, context: BuildContext) -> Any:
            """A loss registered by the test itself."""
            return lambda logits, targets, sample_weight=None: 0.0

        result = ib_cli("list", "losses", "ibtest_*", "--citations")
    row = result.line_with("ibtest_cli_loss")
    assert f"local:{__name__}" in row
    assert "A loss registered by the test itself." in row
    assert "Doe et al., Venue 2024, 'Noise'" in row


def test_plugins_lists_the_builtin_distribution(ib_cli: Callable[..., Any]) -> None:
    result = ib_cli("plugins")
    assert result.rc == 0
    row = result.line_with("ibcore ")
    assert "0.1.0" in row


# --------------------------------------------------------------------------------------------
# ib validate


def test_validate_a_valid_config(ib_cli: Callable[..., Any], config: Callable[..., Path]) -> None:
    path = config(VALID)
    result = ib_cli("validate", str(path))
    assert result.rc == 0
    assert f"{path}: valid (2 runs: ce, focal)" in result.out


def test_validate_an_invalid_config_prints_every_path(ib_cli: Callable[..., Any], config: Callable[..., Path]) -> None:
    path = config(INVALID)
    result = ib_cli("validate", str(path))
    assert result.rc == 1
    assert f"2 errors in {path}:" in result.out
    assert "defaults.optimizer.params.lr:" in result.line_with("greater than")
    row = result.line_with("runs[1].loss.name:")
    assert "Unknown loss 'focall'. Did you mean: focal" in row


def test_validate_several_configs_reports_each_and_fails_if_any_fails(
    ib_cli: Callable[..., Any], config: Callable[..., Path]
) -> None:
    good, bad = config(VALID, "good.yaml"), config(INVALID, "bad.yaml")
    result = ib_cli("validate", str(good), str(bad))
    assert result.rc == 1
    assert f"{good}: valid" in result.out and f"errors in {bad}" in result.out
    assert ib_cli("validate", str(good), str(good)).rc == 0


def test_validate_with_overrides(ib_cli: Callable[..., Any], config: Callable[..., Path]) -> None:
    path = str(config(VALID))
    assert ib_cli("validate", path, "--set", "trainer.epochs=2", "--set", "runs.focal.loss.params.gamma=0.5").rc == 0
    result = ib_cli("validate", path, "--set", "runs.focal.loss.params.gamma=-1")
    assert result.rc == 1
    assert "runs[1].loss.params.gamma" in result.out
    result = ib_cli("validate", path, "--set", "runs.nope.loss.name=focal")
    assert result.rc == 1 and "no run named 'nope'" in result.out


def test_validate_file_problems(ib_cli: Callable[..., Any], config: Callable[..., Path], tmp_path: Path) -> None:
    missing = ib_cli("validate", str(tmp_path / "missing.yaml"))
    assert missing.rc == 1 and "config file does not exist" in missing.out
    broken = ib_cli("validate", str(config("runs: [\n", "broken.yaml")))
    assert broken.rc == 1 and "not valid YAML (line 2" in broken.out


def test_validate_prints_config_text_literally(ib_cli: Callable[..., Any], config: Callable[..., Path]) -> None:
    path = config(VALID.replace("name: cross_entropy", "name: 'cross_entropy[/]'"))
    result = ib_cli("validate", str(path))
    assert result.rc == 1
    assert "Unknown loss 'cross_entropy[/]'" in result.out


def test_run_on_an_invalid_config_fails_before_training(
    ib_cli: Callable[..., Any], config: Callable[..., Path], tmp_path: Path
) -> None:
    result = ib_cli("run", str(config(INVALID)), "--out", str(tmp_path / "runs"))
    assert result.rc == 1
    assert "runs[1].loss.name" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# ib schema


def test_schema_to_a_file(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    target = tmp_path / "ib.schema.json"
    result = ib_cli("schema", "-o", str(target))
    assert result.rc == 0
    assert result.out == ""  # the schema went to the file, not stdout
    assert f"wrote {target}" in result.err
    schema = json.loads(target.read_text(encoding="utf-8"))
    assert schema["title"] == "Experiment"
    assert "cross_entropy" in {c["title"] for c in schema["$defs"]["LossSpec"]["anyOf"]}
    assert json.loads(ib_cli("schema").out) == schema  # stdout gives the same document


# --------------------------------------------------------------------------------------------
# The installed console script


def test_the_ib_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("ib")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not installed with pip)")
    done = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"ibcore {ibcore.__version__}"
