"""Fixtures of the robustness suite; prints how many examples each property test ran."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from _support import EXAMPLES_RUN

from ibcore import registry_snapshot


@pytest.fixture
def isolated_plugins() -> Iterator[None]:
    """Registry and ``sys.modules`` restored after the test, so modules a config imports do not leak."""
    before = set(sys.modules)
    with registry_snapshot():
        yield
    for name in set(sys.modules) - before:
        if name.startswith("ibtest_"):
            del sys.modules[name]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if EXAMPLES_RUN:
        terminalreporter.write_sep("-", "robustness property examples run")
        for name, count in sorted(EXAMPLES_RUN.items()):
            terminalreporter.write_line(f"{name}: {count}")
