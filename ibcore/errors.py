"""Exceptions a user can cause, each with a message that says what to do.

Every error the library raises on purpose derives from :class:`IbError`, so callers can catch
one type; the CLI turns them into a message and exit code 1 instead of a traceback.
"""

from __future__ import annotations


class IbError(Exception):
    """Base class of every error ibcore raises on purpose."""


class RegistryError(IbError):
    """A component name is unknown, ambiguous, registered twice, or its plugin is broken."""


class PluginLoadError(RegistryError):
    """A plugin distribution failed to load (import error, wrong object, raised at load)."""


class ProtocolError(IbError):
    """A built component does not have the methods or attributes its kind requires."""


class BuildError(IbError):
    """A component's factory raised while building it (a plugin bug, out of memory, ...)."""


class ContextError(IbError):
    """A component needs information (class counts, ...) that its build context does not carry."""


class ConfigError(IbError):
    """An experiment config is invalid. ``issues`` holds every problem, each with its path."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"{len(self.issues)} error{'s' if len(self.issues) != 1 else ''}{where}:"]
        lines += [f"  {issue.path or '<root>'}: {issue.message}" for issue in self.issues]
        return "\n".join(lines)


class ConfigIssue:
    """One problem in a config: a dotted path such as ``runs[1].loss.params.gamma`` and a message."""

    __slots__ = ("path", "message")

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def __repr__(self) -> str:
        return f"ConfigIssue({self.path!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfigIssue) and (self.path, self.message) == (other.path, other.message)

    def __hash__(self) -> int:
        return hash((self.path, self.message))


class DataError(IbError):
    """A data set is missing, malformed or inconsistent; the message names the file."""


class CheckpointError(IbError):
    """A checkpoint is missing, truncated, corrupt, or does not match the experiment."""


class TrainingError(IbError):
    """Training cannot start or continue (bad output directory, every run failed, ...)."""


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM from a batch scheduler's time limit, SIGHUP from a closed terminal) that
    ``ib run`` and ``ib resume`` turn into an interruption, so training stops as it does on Ctrl-C.

    ``signum`` is the signal's number; the command exits with ``128 + signum`` (143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        try:
            self.signal_name = signal.Signals(signum).name
        except ValueError:
            self.signal_name = f"signal {signum}"
        super().__init__(f"terminated by {self.signal_name}")
