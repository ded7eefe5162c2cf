"""Plugins that fail in every way a plugin can: the rest keeps working and the user is told which and why.

tests/test_plugin_package.py covers installed distributions that fail at import, resolve to the wrong
object, clash or are disabled (``ib list``/``ib plugins``/``ib validate``). This file adds what happens
when such a plugin reaches ``ib run``: a factory that raises or returns a non-conforming object while
the engine builds it, and local ``plugins:`` modules that break at import or registration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _support import base_config, no_traceback, write_module

import ibcore
from ibcore.registry import reset_discovery

pytestmark = pytest.mark.usefixtures("isolated_plugins")

FAILING_FACTORIES = '''\
from ibcore import NoParams, register_evaluator, register_loss, register_sampler


class _NotALoss:
    """Has no __call__."""


class _HalfAnEvaluator:
    def reset(self):
        pass


class _NotASampler:
    def __len__(self):
        return 0


@register_loss("ibtest_returns_junk", NoParams)
def build_junk(params, context):
    """Returns an object without __call__."""
    return _NotALoss()


@register_loss("ibtest_raises_at_build", NoParams)
def build_raising(params, context):
    """Raises while it is built, as a plugin with a missing resource would."""
    raise RuntimeError("cannot build: lookup table /nonexistent/table.npy is missing")


@register_evaluator("ibtest_half_evaluator", NoParams)
def build_half(params, context):
    """An evaluator with reset() only."""
    return _HalfAnEvaluator()


@register_sampler("ibtest_no_indices", NoParams)
def build_no_indices(params, context):
    """A sampler without indices()."""
    return _NotASampler()
'''


def config_with(tmp_path: Path, edit: Callable[[dict[str, Any]], None], plugins: list[str]) -> Path:
    config = base_config()
    config["trainer"].update(epochs=1, eval_every=1)
    config["data"]["batch_size"] = 512  # three steps an epoch
    config["runs"] = [{"name": "only"}]
    config["plugins"] = plugins
    edit(config)
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_a_factory_returning_a_non_conforming_loss_stops_ib_run_with_a_protocol_error(
    ib_cli: Callable[..., Any], tmp_path: Path
) -> None:
    write_module(tmp_path, "ibtest_failing_factories", FAILING_FACTORIES)
    path = config_with(
        tmp_path, lambda c: c["runs"][0].update(loss={"name": "ibtest_returns_junk"}), ["ibtest_failing_factories"]
    )
    assert ib_cli("validate", str(path)).rc == 0  # params are fine; the object is checked when it is built
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert (
        "loss 'ibtest_returns_junk' built _NotALoss that does not follow the loss protocol; missing: __call__"
        in message
    )
    assert not list((tmp_path / "out").glob("*/metrics.jsonl"))  # stopped before the first step


def test_a_non_conforming_sampler_is_refused_before_training(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    write_module(tmp_path, "ibtest_failing_factories", FAILING_FACTORIES)
    path = config_with(
        tmp_path, lambda c: c["runs"][0].update(sampler={"name": "ibtest_no_indices"}), ["ibtest_failing_factories"]
    )
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert "missing: indices" in " ".join(result.err.split())


def test_a_factory_that_raises_at_build_stops_ib_run_with_a_clear_error(
    ib_cli: Callable[..., Any], tmp_path: Path
) -> None:
    write_module(tmp_path, "ibtest_failing_factories", FAILING_FACTORIES)
    path = config_with(
        tmp_path, lambda c: c["runs"][0].update(loss={"name": "ibtest_raises_at_build"}), ["ibtest_failing_factories"]
    )
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and no_traceback(result.output)
    message = " ".join(result.err.split())
    assert "ibtest_raises_at_build" in message and "local:ibtest_failing_factories" in message
    assert "RuntimeError: cannot build: lookup table /nonexistent/table.npy is missing" in message


def test_a_non_conforming_evaluator_is_refused_before_training(ib_cli: Callable[..., Any], tmp_path: Path) -> None:
    write_module(tmp_path, "ibtest_failing_factories", FAILING_FACTORIES)
    path = config_with(
        tmp_path, lambda c: c.update(evaluators=[{"name": "ibtest_half_evaluator"}]), ["ibtest_failing_factories"]
    )
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert result.rc == 1 and "missing: update, compute" in " ".join(result.err.split())
    trained = list((tmp_path / "out").glob("*/metrics.jsonl"))
    assert not trained, "a training epoch ran before the evaluator was checked"


# --------------------------------------------------------------------------------------------
# `plugins:` modules that break at import or at registration


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise ImportError('needs scipy>=2')\n", "could not import 'ibtest_plugin': ImportError: needs scipy>=2"),
        (
            "from ibcore import register_loss\n\n"
            "@register_loss('cross_entropy')\n"
            "def build(params, context):\n"
            "    '''Takes a built-in name.'''\n"
            "    return None\n",
            "RegistryError: loss 'cross_entropy' is already provided by ibcore",
        ),
    ],
    ids=["import-error", "clash-with-builtin"],
)
def test_a_plugins_module_that_breaks_stops_ib_run_before_a_run_directory(
    ib_cli: Callable[..., Any], tmp_path: Path, source: str, expected: str
) -> None:
    write_module(tmp_path, "ibtest_plugin", source)
    path = config_with(tmp_path, lambda c: c["data"].update(batch_size=32), ["ibtest_plugin"])
    for command in (["validate", str(path)], ["run", str(path), "--quiet", "--out", str(tmp_path / "out")]):
        result = ib_cli(*command)
        assert result.rc == 1 and no_traceback(result.output), result.output
        message = " ".join(result.output.split())
        assert "plugins[0]" in message and expected in message
    assert not (tmp_path / "out").exists()
    # the built-ins the module tried to shadow are untouched
    assert ibcore.list_components("loss", "cross_entropy")[0].provider == "ibcore"


def test_a_loss_class_without_call_is_refused_at_registration() -> None:
    class NotALoss:
        """A loss class that forgot __call__."""

        def __init__(self, params: Any, context: Any) -> None:
            pass

    with pytest.raises(ibcore.RegistryError, match="missing: __call__"):
        ibcore.register_loss("ibtest_class_without_call")(NotALoss)


def test_using_a_component_of_a_disabled_distribution_says_it_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IB_DISABLE_PLUGINS", "ibcore")
    reset_discovery()  # isolated_plugins restores the registry afterwards
    messages = {issue.path: issue.message for issue in ibcore.validate(base_config())}
    assert "IB_DISABLE_PLUGINS" in messages["data.dataset.name"] and "ibcore" in messages["data.dataset.name"]
