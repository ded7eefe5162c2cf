"""Plugins as a third party ships them: a real pip-installed package, and broken or clashing distributions.

Each test runs ``ib`` in a fresh interpreter whose PYTHONPATH holds the plugin's folder, so entry
points are discovered exactly as after ``pip install``, and nothing leaks into this process's registry.
Hand-made distributions are a ``<name>-<version>.dist-info`` folder (METADATA and entry_points.txt)
next to their module: all that ``importlib.metadata`` needs to find an installed package.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _distributions import write_distribution

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SOURCE = REPO_ROOT / "examples" / "plugin-package"
BUILTIN_PLURALS = ("datasets", "samplers", "losses", "backbones", "optimizers", "evaluators", "mixers", "adjustments")

Run = Callable[..., Any]  # the ib_subprocess fixture of conftest.py


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/plugin-package installed for real with pip into its own folder (no network, no deps)."""
    work = tmp_path_factory.mktemp("ib-plugin-demo")
    # Build from a copy: pip builds in the source tree and would leave build/ and *.egg-info in the repo.
    source = shutil.copytree(
        DEMO_SOURCE, work / "source", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    site = work / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "ib_plugin_demo-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


def write_config(folder: Path, loss: str, sampler: str | None = None, name: str = "exp.yaml") -> Path:
    """A small valid config on light built-ins, with ``loss`` (and ``sampler``) as given (YAML flow mappings)."""
    sampler_line = f"\n    sampler: {sampler}" if sampler else ""
    text = f"""\
data:
  dataset: {{name: mnist_lt}}
trainer: {{epochs: 4}}
defaults:
  backbone: {{name: small_cnn}}
  optimizer: {{name: sgd, params: {{lr: 0.1}}}}
runs:
  - name: a
    loss: {loss}{sampler_line}
"""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# The example package, installed with pip


def test_demo_components_are_listed_with_their_provider(ib_subprocess: Run, demo_site: Path) -> None:
    result = ib_subprocess(["list"], python_path=[demo_site])
    assert result.rc == 0, result.output
    poly = result.line_with("poly1")
    assert "ib-plugin-demo 0.1.0" in poly and "Poly-1 loss" in poly
    assert "ib-plugin-demo 0.1.0" in result.line_with("square_root")
    assert "ibcore 0.1.0" in result.line_with("cross_entropy ")  # the built-ins are still there

    citations = ib_subprocess(["list", "losses", "poly*", "--citations"], python_path=[demo_site])
    assert "Leng et al., ICLR 2022" in citations.line_with("poly1")

    plugins = ib_subprocess(["plugins"], python_path=[demo_site])
    row = plugins.line_with("ib-plugin-demo")
    assert "0.1.0" in row and "ok" in row and "2" in row


def test_a_config_using_the_demo_components_validates(ib_subprocess: Run, demo_site: Path, tmp_path: Path) -> None:
    good = write_config(
        tmp_path, "{name: poly1, params: {epsilon: 2.0}}", "{name: square_root, params: {seed: 3}}", "good.yaml"
    )
    qualified = write_config(tmp_path, "{name: 'ib-plugin-demo:poly1'}", "{name: square_root}", "qualified.yaml")
    result = ib_subprocess(["validate", str(good), str(qualified)], python_path=[demo_site])
    assert result.rc == 0, result.output

    bad = write_config(tmp_path, "{name: poly1, params: {epsilon: -2.0, epsilom: 1}}", name="bad.yaml")
    result = ib_subprocess(["validate", str(bad)], python_path=[demo_site])
    assert result.rc == 1
    assert "greater than or equal to -1" in result.line_with("runs[0].loss.params.epsilon:")
    assert "did you mean 'epsilon'" in result.line_with("runs[0].loss.params.epsilom:")

    without = ib_subprocess(["validate", str(good)])  # not installed: an unknown name, not a crash
    # (installed by the user as well: the suite switches it off in its subprocesses, and the message says so)
    installed = any((d.metadata["Name"] or "").lower() == "ib-plugin-demo" for d in importlib.metadata.distributions())
    expected = "switches off" if installed else "Unknown loss 'poly1'"
    assert without.rc == 1 and expected in without.output


BUILD_DEMO = """\
import json
import torch
import ibcore
from ibcore import BuildContext

context = BuildContext.from_targets([0] * 16 + [1] * 4 + [2] * 1, num_classes=3, seed=7)
logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
targets = torch.tensor([0, 2])
weight = torch.tensor([0.25, 1.0])
poly = ibcore.build("loss", "poly1", {"epsilon": 2.0}, context=context)
plain = ibcore.build("loss", "poly1", {"epsilon": 0.0}, context=context)
default = ibcore.build("loss", "ib-plugin-demo:poly1", None, context=context)

sampler = ibcore.build("sampler", "square_root", {}, context=context)
same_seed = ibcore.build("sampler", "square_root", {"seed": 7}, context=context)
big = BuildContext.from_targets([0] * 400 + [1] * 100 + [2] * 25, num_classes=3)
frequent = ibcore.build("sampler", "square_root", {"seed": 1}, context=big)
drawn = [0, 0, 0]
for epoch in range(40):
    for index in frequent.indices(epoch).tolist():
        drawn[big.targets[index]] += 1
print(json.dumps({
    "poly": poly(logits, targets).item(),
    "ce": plain(logits, targets).item(),
    "torch_ce": torch.nn.functional.cross_entropy(logits, targets).item(),
    "default_epsilon": default.epsilon,
    "weighted": poly(logits, targets, weight).item(),
    "mixed": (poly(logits, targets, weight) + poly(logits, targets, 1 - weight)).item(),
    "length": len(sampler),
    "epoch0": sampler.indices(0).tolist(),
    "epoch0_again": sampler.indices(0).tolist(),
    "epoch1": sampler.indices(1).tolist(),
    "same_seed_epoch0": same_seed.indices(0).tolist(),
    "dtype": str(sampler.indices(0).dtype),
    "frequencies": [count / sum(drawn) for count in drawn],
}))
"""


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


def test_the_demo_components_build_and_follow_their_papers(ib_subprocess: Run, demo_site: Path) -> None:
    result = ib_subprocess(code=BUILD_DEMO, python_path=[demo_site])
    assert result.rc == 0, result.output
    got = json.loads(result.out.strip().splitlines()[-1])

    # Poly-1 (Leng et al., ICLR 2022, eq. 3): L = CE + ε(1 - p_t) per sample, averaged over the batch.
    log_pt = [_log_softmax([2.0, 0.0, -1.0])[0], _log_softmax([0.5, 1.5, 0.0])[2]]
    per_sample = [-lp + 2.0 * (1.0 - math.exp(lp)) for lp in log_pt]
    assert got["poly"] == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    assert got["ce"] == pytest.approx(-sum(log_pt) / 2, rel=1e-6)
    assert got["ce"] == pytest.approx(got["torch_ce"], rel=1e-6)  # ε = 0 is cross-entropy
    assert got["default_epsilon"] == 1.0
    # ibcore's sample_weight protocol: weights scale the terms, the divisor stays the batch size.
    assert got["weighted"] == pytest.approx((0.25 * per_sample[0] + per_sample[1]) / 2, rel=1e-6)
    assert got["mixed"] == pytest.approx(got["poly"], rel=1e-6)

    # Square-root sampling: one epoch has as many draws as samples; a pure function of (seed, epoch).
    assert got["length"] == 21 and len(got["epoch0"]) == 21 and got["dtype"] == "int64"
    assert got["epoch0"] == got["epoch0_again"] == got["same_seed_epoch0"]  # params.seed null → context.seed
    assert got["epoch0"] != got["epoch1"]
    # Counts 400/100/25 → sqrt 20/10/5 → p = 4/7, 2/7, 1/7 (21,000 draws: 6 standard deviations ≈ 0.02).
    assert got["frequencies"] == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=0.02)


NO_HEAVY_IMPORTS = """\
import sys
from ibcore.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "numpy") if m in sys.modules)
print("RESULT", rc, ",".join(heavy) or "none")
"""


@pytest.mark.parametrize("command", ["list", "plugins", "validate"])
def test_list_plugins_and_validate_do_not_import_torch(
    ib_subprocess: Run, demo_site: Path, tmp_path: Path, command: str
) -> None:
    args = [command]
    if command == "validate":
        args.append(str(write_config(tmp_path, "{name: poly1}", "{name: square_root}")))
    result = ib_subprocess(args, code=NO_HEAVY_IMPORTS, python_path=[demo_site])
    assert result.line_with("RESULT") == "RESULT 0 none", result.output


# --------------------------------------------------------------------------------------------
# Broken plugins


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    return write_distribution(
        tmp_path / "broken",
        "ib-plugin-broken",
        {"ibcore.losses": {"broken_loss": "ib_plugin_broken_mod"}},
        "raise RuntimeError('boom: the plugin is broken at import')\n",
    )


def test_a_plugin_that_raises_at_import_is_reported_and_does_not_stop_list(
    ib_subprocess: Run, broken_site: Path, tmp_path: Path
) -> None:
    plugins = ib_subprocess(["plugins"], python_path=[broken_site])
    assert plugins.rc == 0
    row = plugins.line_with("ib-plugin-broken ")
    assert "0.1.0" in row and "failed" in row
    error = plugins.line_with("ib-plugin-broken:")
    assert "loss 'broken_loss'" in error and "RuntimeError: boom: the plugin is broken at import" in error
    assert "ok" in plugins.line_with("ibcore ")  # the built-ins are unaffected

    listed = ib_subprocess(["list", "losses"], python_path=[broken_site])
    assert listed.rc == 0
    assert "failed to load: see `ib plugins`" in listed.line_with("broken_loss")
    assert "ibcore 0.1.0" in listed.line_with("cross_entropy ")

    # Using it names the cause; a config that does not use it is fine.
    used = ib_subprocess(["validate", str(write_config(tmp_path, "{name: broken_loss}"))], python_path=[broken_site])
    assert used.rc == 1
    assert "loss 'broken_loss' cannot be used" in used.output and "RuntimeError: boom" in used.output
    unused = write_config(tmp_path, "{name: cross_entropy}", name="unused.yaml")
    assert ib_subprocess(["validate", str(unused)], python_path=[broken_site]).rc == 0


def test_strict_mode_makes_a_broken_plugin_fatal(ib_subprocess: Run, broken_site: Path, demo_site: Path) -> None:
    result = ib_subprocess(["list"], python_path=[broken_site], env={"IB_STRICT_PLUGINS": "1"})
    assert result.rc == 1
    assert "IB_STRICT_PLUGINS is set" in result.err
    assert "RuntimeError: boom" in result.err and "Traceback" not in result.err
    # Strict with healthy plugins only (built-ins switched off, to test the switch alone) passes.
    healthy = ib_subprocess(
        ["list"], python_path=[demo_site], env={"IB_STRICT_PLUGINS": "1", "IB_DISABLE_PLUGINS": "ibcore"}
    )
    assert healthy.rc == 0 and "ib-plugin-demo 0.1.0" in healthy.line_with("poly1")
    # IB_STRICT_PLUGINS=0 is off.
    assert ib_subprocess(["list"], python_path=[broken_site], env={"IB_STRICT_PLUGINS": "0"}).rc == 0


def test_every_builtin_loads_in_strict_mode(ib_subprocess: Run) -> None:
    result = ib_subprocess(["list"], env={"IB_STRICT_PLUGINS": "1"})
    assert result.rc == 0, result.err


def test_entry_points_that_resolve_to_the_wrong_object_are_reported(ib_subprocess: Run, tmp_path: Path) -> None:
    site = write_distribution(
        tmp_path / "wrong",
        "ib-plugin-wrong",
        {
            "ibcore.losses": {
                "wrong_object": "ib_plugin_wrong_mod:NOT_A_COMPONENT",
                "silent_module": "ib_plugin_wrong_mod",
                "real_loss": "ib_plugin_wrong_mod:build_real_loss",
            },
            "ibcore.samplers": {"misfiled": "ib_plugin_wrong_mod:build_real_loss"},
        },
        """\
        from ibcore import register_loss

        NOT_A_COMPONENT = {"looks": "like a config"}


        @register_loss("real_loss")
        def build_real_loss(params, context):
            \"\"\"A loss that works.\"\"\"
            return lambda logits, targets, sample_weight=None: 0.0
        """,
    )
    result = ib_subprocess(["plugins"], python_path=[site])
    assert result.rc == 0
    assert "failed" in result.line_with("ib-plugin-wrong ")
    assert (
        "resolved to dict {'looks': 'like a config'}, which is not an ibcore component; decorate it with "
        "@register_loss('wrong_object', ...)" in result.line_with("'wrong_object'")
    )
    assert "was imported but did not register a loss named 'silent_module'" in result.line_with("'silent_module'")
    assert "resolved to the loss 'real_loss', not a sampler named 'misfiled'" in result.line_with("'misfiled'")

    listed = ib_subprocess(["list"], python_path=[site])
    assert listed.rc == 0
    assert "A loss that works." in listed.line_with("real_loss")
    assert "failed to load" in listed.line_with("wrong_object")


# --------------------------------------------------------------------------------------------
# Two providers of one name


@pytest.fixture
def clash_site(tmp_path: Path) -> Path:
    return write_distribution(
        tmp_path / "clash",
        "ib-plugin-clash",
        {"ibcore.losses": {"cross_entropy": "ib_plugin_clash_mod"}},
        """\
        from ibcore import BuildContext, NoParams, register_loss


        class ZeroLoss:
            def __call__(self, logits, targets, sample_weight=None):
                return 0.0


        @register_loss("cross_entropy")
        def build_cross_entropy(params: NoParams, context: BuildContext) -> ZeroLoss:
            \"\"\"Another distribution's cross_entropy (always zero).\"\"\"
            return ZeroLoss()
        """,
    )


def test_a_name_clash_warns_at_discovery_and_fails_on_use(ib_subprocess: Run, clash_site: Path, tmp_path: Path) -> None:
    listed = ib_subprocess(["list", "losses"], python_path=[clash_site])
    assert listed.rc == 0
    warning = listed.line_with("warning:")  # which provider is named first depends on the order of sys.path
    assert "loss 'cross_entropy' is provided by both" in warning
    assert "ibcore" in warning and "ib-plugin-clash" in warning and ":cross_entropy' (or another provider)" in warning
    rows = [line for line in listed.out.splitlines() if "cross_entropy " in line and "sigmoid" not in line]
    assert len(rows) == 2 and any("ib-plugin-clash 0.1.0" in r for r in rows) and any("ibcore 0.1.0" in r for r in rows)

    plain = write_config(tmp_path, "{name: cross_entropy}", name="plain.yaml")
    result = ib_subprocess(["validate", str(plain)], python_path=[clash_site])
    assert result.rc == 1
    assert "runs[0].loss.name" in result.output
    assert "write one of 'ib-plugin-clash:cross_entropy', 'ibcore:cross_entropy' to choose" in result.output

    qualified = [
        write_config(tmp_path, "{name: 'ib-plugin-clash:cross_entropy'}", name="theirs.yaml"),
        write_config(tmp_path, "{name: 'ibcore:cross_entropy'}", name="ours.yaml"),
    ]
    assert ib_subprocess(["validate", *map(str, qualified)], python_path=[clash_site]).rc == 0

    built = ib_subprocess(
        code="import ibcore\n"
        "print(type(ibcore.build('loss', 'ib-plugin-clash:cross_entropy')).__name__)\n"
        "print(type(ibcore.build('loss', 'ibcore:cross_entropy')).__module__.split('.')[0])\n",
        python_path=[clash_site],
    )
    assert built.rc == 0, built.output
    assert built.out.split() == ["ZeroLoss", "ib_plugins_builtin"]


@pytest.mark.parametrize(
    "disabled",
    [
        "ib-plugin-clash",
        "some-other-dist,IB_Plugin.Clash",  # distribution names are compared normalised, like pip does
        pytest.param(
            "some-other-dist, ib-plugin-clash",
            marks=(),
        ),
    ],
)
def test_disabling_a_distribution_skips_it(ib_subprocess: Run, clash_site: Path, tmp_path: Path, disabled: str) -> None:
    env = {"IB_DISABLE_PLUGINS": disabled}
    listed = ib_subprocess(["list", "losses"], python_path=[clash_site], env=env)
    assert listed.rc == 0 and "warning" not in listed.err
    assert "ib-plugin-clash" not in listed.out

    plain = write_config(tmp_path, "{name: cross_entropy}", name="plain.yaml")
    assert ib_subprocess(["validate", str(plain)], python_path=[clash_site], env=env).rc == 0
    theirs = write_config(tmp_path, "{name: 'ib-plugin-clash:cross_entropy'}", name="theirs.yaml")
    result = ib_subprocess(["validate", str(theirs)], python_path=[clash_site], env=env)
    assert result.rc == 1 and "has no provider 'ib-plugin-clash'" in result.output

    plugins = ib_subprocess(["plugins"], python_path=[clash_site], env=env)
    assert "disabled" in plugins.line_with("ib-plugin-clash")


# --------------------------------------------------------------------------------------------
# The core without its built-ins


def test_the_core_works_with_the_builtins_disabled(ib_subprocess: Run, tmp_path: Path) -> None:
    env = {"IB_DISABLE_PLUGINS": "ibcore"}
    listed = ib_subprocess(["list"], env=env)
    assert listed.rc == 0, listed.output
    for plural in BUILTIN_PLURALS:
        assert f"{plural} (0)" in listed.out and f"no {plural} installed" in listed.out
    assert "disabled" in ib_subprocess(["plugins"], env=env).line_with("ibcore")

    result = ib_subprocess(["validate", str(write_config(tmp_path, "{name: cross_entropy}"))], env=env)
    assert result.rc == 1
    assert "loss 'cross_entropy' is provided by ibcore, which IB_DISABLE_PLUGINS switches off" in result.line_with(
        "runs[0].loss.name"
    )


def test_the_core_works_when_the_builtin_package_cannot_be_imported(ib_subprocess: Run, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "ib_plugins_builtin"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ib_plugins_builtin is missing (simulated)')\n")

    probe = ib_subprocess(
        code="import ibcore, ibcore.config, ibcore.cli; print('imported')", python_path=[shadow.parent]
    )
    assert probe.rc == 0 and probe.out.strip() == "imported"

    listed = ib_subprocess(["list"], python_path=[shadow.parent])
    assert listed.rc == 0, listed.output
    assert "failed to load: see `ib plugins`" in listed.line_with("cross_entropy ")
    assert "failed to load" in listed.line_with("resnet32")

    plugins = ib_subprocess(["plugins"], python_path=[shadow.parent])
    assert plugins.rc == 0
    assert "failed" in plugins.line_with("ibcore ")
    assert "ImportError: ib_plugins_builtin is missing (simulated)" in plugins.output

    result = ib_subprocess(
        ["validate", str(write_config(tmp_path, "{name: cross_entropy}"))], python_path=[shadow.parent]
    )
    assert result.rc == 1
    assert "cannot be used" in result.line_with("runs[0].loss.name") and "simulated" in result.output
