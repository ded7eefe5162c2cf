"""The ``ib`` command as a user types it: versions, help, listing, validation exit codes, schema export.

Most tests call ``ibcore.cli.main`` in this process (fast); the console-script test starts the real
``ib`` next to the interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
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


SUBCOMMANDS = ["list", "plugins", "validate", "schema", "run", "resume", "report", "compare"]


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


# --------------------------------------------------------------------------------------------
# Components of the user's own modules: --plugins MODULE, --config FILE


@pytest.fixture
def isolated_imports() -> Iterator[None]:
    """Registry and sys.modules as they were, so a module imported by --plugins does not leak."""
    before = set(sys.modules)
    with registry_snapshot():
        yield
    for name in set(sys.modules) - before:
        if name.startswith("ibtest_"):
            del sys.modules[name]


PLUGIN = """\
from pydantic import Field
from ibcore import Params, register_loss


class TemperatureParams(Params):
    ibtest_temperature: float = Field(1.5, gt=0, description="Only this plugin has it.")


@register_loss("{name}", TemperatureParams)
def build(params, context):
    \"\"\"A loss from the user's own module.\"\"\"
    return lambda logits, targets, sample_weight=None: 0.0
"""


def test_list_plugins_and_schema_include_the_modules_named_by_plugins(
    ib_cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_imports: None
) -> None:
    (tmp_path / "ibtest_cli_losses.py").write_text(PLUGIN.replace("{name}", "ibtest_cli_loss"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # looked for in the working directory, as `python -m` would
    listed = ib_cli("list", "losses", "--plugins", "ibtest_cli_losses")
    assert listed.rc == 0
    row = listed.line_with("ibtest_cli_loss ")
    assert "local:ibtest_cli_losses" in row and "A loss from the user's own module." in row
    plugins = ib_cli("plugins", "--plugins", "ibtest_cli_losses")
    assert "loss local:ibtest_cli_losses:ibtest_cli_loss" in plugins.line_with("Registered in this process")
    schema = json.loads(ib_cli("schema", "--plugins", "ibtest_cli_losses").out)
    mine = {c["title"]: c for c in schema["$defs"]["LossSpec"]["anyOf"]}["ibtest_cli_loss"]
    assert mine["properties"]["params"]["properties"]["ibtest_temperature"]["default"] == 1.5


def test_list_and_schema_import_the_plugins_of_a_config(
    ib_cli: Callable[..., Any],
    config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolated_imports: None,
) -> None:
    config(PLUGIN.replace("{name}", "ibtest_config_loss"), "ibtest_config_losses.py")
    path = config("plugins: [ibtest_config_losses]\n" + VALID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the config's folder is searched first
    target = tmp_path / "ib.schema.json"
    assert ib_cli("schema", "--config", str(path), "-o", str(target)).rc == 0
    schema = json.loads(target.read_text(encoding="utf-8"))
    assert "ibtest_config_loss" in {c["title"] for c in schema["$defs"]["LossSpec"]["anyOf"]}
    assert "local:ibtest_config_losses" in ib_cli("list", "losses", "--config", str(path)).line_with(
        "ibtest_config_loss"
    )


def test_a_plugin_module_that_is_not_found_says_where_it_was_looked_for(
    ib_cli: Callable[..., Any],
    config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolated_imports: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    result = ib_cli("list", "--plugins", "ibtest_nowhere")
    assert result.rc == 1
    assert result.line_with("--plugins[0]").strip() == (
        f"--plugins[0]: could not import 'ibtest_nowhere': no module named 'ibtest_nowhere' in the working "
        f"directory {tmp_path.resolve()} or the installed packages"
    )
    path = config("plugins: [ibtest_nowhere]\n" + VALID)
    result = ib_cli("schema", "--config", str(path))
    assert result.rc == 1 and f"1 error in {path}" in result.err
    assert "plugins[0]: could not import 'ibtest_nowhere'" in result.err and result.out == ""


# --------------------------------------------------------------------------------------------
# ib run: Ctrl-C, and a failure before the first batch

TINY = """\
seed: 1
data:
  dataset: {name: mnist_lt, params: {imbalance_ratio: 100, test_per_class: 10}}
  batch_size: 256
trainer: {epochs: 3, eval_every: 1, checkpoint_every: 1, device: cpu}
defaults:
  backbone: {name: small_cnn}
  optimizer: {name: sgd, params: {lr: 0.05}}
runs:
  - name: ce
    loss: {name: cross_entropy}
evaluators: [{name: accuracy}]
"""


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, stop: int) -> None:
    """Ctrl-C when epoch ``stop`` begins (after the checkpoints of the epochs before it)."""
    from ibcore.engine.trainer import Trainer

    original = Trainer.train_epoch

    def train_epoch(self: Trainer, epoch: int) -> None:
        if epoch == stop:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize(
    ("stop", "continues"),
    [
        (2, "it continues after epoch 2 of 3, from the newest checkpoint"),
        (0, "no checkpoint was written yet, so it starts again from the beginning"),
    ],
)
def test_ctrl_c_prints_the_command_that_continues_the_run(
    ib_cli: Callable[..., Any],
    config: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: int,
    continues: str,
) -> None:
    path, out = str(config(TINY)), tmp_path / "out"
    with monkeypatch.context() as patched:
        _interrupt_at(patched, stop)
        result = ib_cli("run", path, "--quiet", "--out", str(out))
    assert result.rc == 130
    [run_dir] = out.iterdir()
    assert result.err == f"interrupted. To continue, run: ib resume {run_dir} ({continues})\n"
    # the printed command does what it says, to the numbers of an uninterrupted run
    resumed = ib_cli("resume", str(run_dir), "--quiet")
    assert resumed.rc == 0, resumed.output
    full = ib_cli("run", path, "--quiet", "--out", str(tmp_path / "full"))
    assert full.rc == 0
    [full_dir] = (tmp_path / "full").iterdir()
    assert _results(run_dir) == _results(full_dir)


def _results(run_dir: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The final rows and every metrics line, without the epoch times."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    return results["last"], [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def test_ctrl_c_during_ib_resume_prints_the_same_command(
    ib_cli: Callable[..., Any], config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        _interrupt_at(patched, 1)
        assert ib_cli("run", str(config(TINY)), "--quiet", "--out", str(out)).rc == 130
    [run_dir] = out.iterdir()
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal: the command is still one line, to copy
    _interrupt_at(monkeypatch, 2)
    result = ib_cli("resume", str(run_dir), "--quiet")
    assert result.rc == 130
    assert result.err == (
        f"interrupted. To continue, run: ib resume {run_dir} (it continues after epoch 2 of 3, from the newest "
        "checkpoint)\n"
    )


def test_a_run_that_fails_before_the_first_batch_leaves_no_run_directory(
    ib_cli: Callable[..., Any], config: Callable[..., Path], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.npz"
    path = str(
        config(
            TINY.replace(
                "{name: mnist_lt, params: {imbalance_ratio: 100, test_per_class: 10}}",
                f"{{name: array_file, params: {{path: '{missing}'}}}}",
            )
        )
    )
    result = ib_cli("run", path, "--quiet", "--out", str(tmp_path / "new" / "runs"))
    assert result.rc == 1 and "missing.npz" in result.err and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()  # neither the run directory nor the folders made for it
    existing = tmp_path / "existing"
    existing.mkdir()
    assert ib_cli("run", path, "--quiet", "--out", str(existing)).rc == 1
    assert list(existing.iterdir()) == []  # a folder the user had stays, empty as it was
