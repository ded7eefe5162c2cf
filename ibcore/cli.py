"""The ``ib`` command: list, plugins, validate, schema, run, resume, report, compare.

Every error a user can cause ends as a message on stderr and exit code 1, never a traceback
(``IB_DEBUG=1`` shows the traceback for bug reports).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ibcore import __version__
from ibcore.errors import ConfigError, IbError, Terminated
from ibcore.kinds import get_kind, kind_names
from ibcore.registry import RegistryWarning, _check_kind, distributions, list_components


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _import_requested_plugins(args: argparse.Namespace) -> None:
    """``--plugins MODULE`` and ``--config FILE``: import the user's own components before listing them.

    Modules are looked for as a config's ``plugins:`` are: ``--config``'s in the config's folder first,
    ``--plugins`` ones in the working directory, then the installed packages.
    """
    from ibcore.config.validation import import_config_plugins, import_plugins

    if args.config:
        import_config_plugins(args.config)
    if args.plugins:
        issues = import_plugins(list(args.plugins), label="--plugins")
        if issues:
            raise ConfigError(issues)


def _add_plugin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first, so the components it registers are included (repeatable); looked for "
        "in the working directory, then the installed packages",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="import the plugins: modules of this experiment config first (looked for as `ib run` does)",
    )


def _cmd_list(args: argparse.Namespace) -> int:
    _import_requested_plugins(args)
    infos = list_components(args.kind, args.pattern, load=True)
    console = _console()
    kinds = [_check_kind(args.kind)] if args.kind else list(kind_names())
    for kind in kinds:
        rows = [i for i in infos if i.kind == kind]
        table = Table(title=f"{get_kind(kind).plural} ({len(rows)})", title_justify="left", expand=False)
        table.add_column("name", style="bold")
        table.add_column("provider")
        table.add_column("description")
        if args.citations:
            table.add_column("citation")
        for info in rows:
            description = (
                escape(info.description) if info.error is None else "[red]failed to load: see `ib plugins`[/red]"
            )
            cells = [escape(info.name), escape(info.provider_label), description]
            if args.citations:
                cells.append(escape(info.citation or ""))
            table.add_row(*cells)
        if not rows:
            table.add_row(f"[dim]no {get_kind(kind).plural} installed[/dim]", "", "")
        console.print(table)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    _import_requested_plugins(args)
    console = _console()
    dists = distributions()
    if not dists:
        console.print("No plugin distributions are installed (no ibcore.* entry points found).")
        return 0
    table = Table(title="plugin distributions", title_justify="left")
    table.add_column("distribution", style="bold")
    table.add_column("version")
    table.add_column("status")
    table.add_column("components")
    for dist in dists:
        colour = {"ok": "green", "failed": "red", "disabled": "yellow"}[dist.status]
        table.add_row(
            escape(dist.name),
            escape(dist.version or "?"),
            f"[{colour}]{dist.status}[/{colour}]",
            str(len(dist.components)),
        )
    console.print(table)
    for dist in dists:
        for error in dist.errors:
            console.print(f"[red]{escape(dist.name)}[/red]: {escape(error)}", markup=True)
    local = [i for i in list_components(load=False) if i.provider.startswith("local:")]
    if local:
        console.print(
            "Registered in this process: " + ", ".join(f"{i.kind} {i.qualified_name}" for i in local), markup=False
        )
    return 0


def _print_config_error(error: ConfigError, console: Console) -> None:
    where = f" in {escape(error.source)}" if error.source else ""
    console.print(f"[red]✗[/red] {len(error.issues)} error{'s' if len(error.issues) != 1 else ''}{where}:")
    for issue in error.issues:
        console.print(
            f"  [bold]{escape(issue.path or '<file>')}[/bold]: {escape(issue.message)}", markup=True, highlight=False
        )


def _stdout_to_devnull(stream: Any = None) -> None:
    """Point the file descriptor of ``stream`` (stdout by default) at /dev/null: its reader is gone (``| head``)."""
    try:
        fd = (stream or sys.stdout).fileno()
    except (OSError, ValueError, AttributeError):  # a captured stream (tests, notebooks) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _write_stdout(text: str) -> None:
    """Machine-readable output (JSON, YAML); dropped without an error once the reader closed the pipe."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


@contextlib.contextmanager
def _output_survives_a_closed_pipe() -> Iterator[None]:
    """``ib run ... | head``: once the reader is gone, console output goes nowhere and the command goes on.

    Rich's default is to exit on a ``BrokenPipeError`` (``Console.on_broken_pipe``), which would stop training
    while train.log and the run directory still need writing.
    """
    original = Console.on_broken_pipe

    def on_broken_pipe(console: Console) -> None:
        console.quiet = True
        _stdout_to_devnull(getattr(console, "file", None))

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Console.on_broken_pipe = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (a batch scheduler's time limit) and SIGHUP (a closed terminal) stop training as Ctrl-C does: the
    run directory says how to continue, and the exit code is 128 + the signal's number (143 for SIGTERM).

    A signal already ignored (``nohup`` ignores SIGHUP) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _cmd_validate(args: argparse.Namespace) -> int:
    from ibcore.config import load_experiment, resolved_config

    # With --print, stdout holds only the resolved YAML (to redirect into a file); the report goes to stderr.
    console = _console(stderr=args.print)
    failed = False
    for path in args.configs:
        try:
            # A plugin that prints while imported must not end up in the YAML: its output goes to stderr.
            with contextlib.redirect_stdout(sys.stderr) if args.print else contextlib.nullcontext():
                experiment = load_experiment(path, overrides=args.set)
        except ConfigError as exc:
            failed = True
            if exc.source is None:
                exc.source = path
            _print_config_error(exc, console)
        else:
            from ibcore.engine.repeats import expand_runs  # no torch: the config layer only

            count, trained = len(experiment.runs), len(expand_runs(experiment))
            repeats = f"; {trained} trained, one per seed" if trained != count else ""
            console.print(
                f"[green]✓[/green] {escape(path)}: valid ({count} run{'s' if count != 1 else ''}: "
                f"{escape(', '.join(r.name for r in experiment.runs))}{repeats})"
            )
            if args.print:
                text = yaml.safe_dump(resolved_config(experiment), sort_keys=False, allow_unicode=True)
                header = f"--- # {path}\n" if len(args.configs) > 1 else ""
                _write_stdout(header + text)
    return 1 if failed else 0


def _output_file(given: str, option: str = "-o", example: str = "ib.schema.json") -> Path:
    """The file ``-o`` names, checked before any work: a folder, or a file in a folder that does not exist, is
    an error that says so."""
    path = Path(given).expanduser()
    if path.is_dir():
        raise IbError(f"{option} {given}: is a folder; name a file in it, e.g. {option} {path / example}")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise IbError(f"{option} {given}: cannot write there: the folder {path.parent} {what}")
    return path


def _cmd_schema(args: argparse.Namespace) -> int:
    from ibcore.config import experiment_json_schema

    output = _output_file(args.output) if args.output else None
    # Plugins are imported here (--plugins, --config, entry points): what they print goes to stderr, so stdout
    # holds the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        _import_requested_plugins(args)
        schema = experiment_json_schema()
    text = json.dumps(schema, indent=2, sort_keys=False)
    if output is not None:
        from ibcore.files import atomic_write_text

        atomic_write_text(output, text + "\n")
        _console(stderr=True).print(f"wrote {escape(str(output))}")
    else:
        _write_stdout(text + "\n")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of batches (1 or more), got {text!r}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from ibcore.engine import run

    only = [name.strip() for part in args.only for name in part.split(",") if name.strip()] or None
    with _signals_interrupt():
        results = run(args.config, overrides=args.set, out_dir=args.out, quiet=args.quiet, smoke=args.smoke, only=only)
    _print_quiet_table(args, results)
    return _exit_code(results)


def _print_quiet_table(args: argparse.Namespace, results: object) -> None:
    """``--quiet`` silences the progress and log lines, not the answer: the final table is still printed."""
    if args.quiet and hasattr(results, "rows"):
        from ibcore.report.console import console_table

        title = f"results ({getattr(results, 'run_dir', '')})"  # plain text: console_table does not read markup
        _console().print(console_table(results.rows, title=title, labels=getattr(results, "labels", None)))


def _exit_code(results: object) -> int:
    """1 when every run failed (non-finite loss), so scripts can tell a wasted experiment from a good one."""
    rows = getattr(results, "rows", None) or []
    if rows and all(str(row.get("status", "ok")) != "ok" for row in rows):
        _console(stderr=True).print("[red]error:[/red] every run failed; see the status column and train.log")
        return 1
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from ibcore.engine import resume

    with _signals_interrupt():
        results = resume(args.run_dir, quiet=args.quiet)
    _print_quiet_table(args, results)
    return _exit_code(results)


def _cmd_report(args: argparse.Namespace) -> int:
    if args.format is not None or args.output is not None:  # the table alone; the run directory is only read
        from ibcore.report.compare import report_table

        return _print_summary_table(args, lambda: report_table(args.run_dir))
    from ibcore.report import render_run_dir

    run_dir = Path(args.run_dir).expanduser()
    console = _console()
    render_run_dir(run_dir, console=console)
    if args.html:
        from ibcore.report.html import write_html_report

        console.print(f"report: {escape(str(write_html_report(run_dir)))}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ibcore.report.compare import compare_run_dirs

    return _print_summary_table(args, lambda: compare_run_dirs(args.run_dirs))


def _print_summary_table(args: argparse.Namespace, build: Callable[[], Any]) -> int:
    """``--format`` and ``--output`` of ``ib report`` and ``ib compare``: the table on stdout (the console table
    by default) or in a file, written atomically; warnings go to stderr."""
    from ibcore.report.formats import format_for, render, to_console

    output = _output_file(args.output, option="--output", example="results.tex") if args.output else None
    fmt = format_for(args.output, args.format)
    table = build()
    err = _console(stderr=True)
    if output is not None:
        from ibcore.files import atomic_write_text

        atomic_write_text(output, render(table, fmt))
        err.print(f"wrote {escape(str(output))} ({fmt})")
    elif fmt == "console":
        _console().print(to_console(table))
    else:
        _write_stdout(render(table, fmt))
    for warning in table.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    return 0


def _add_format_options(parser: argparse.ArgumentParser) -> None:
    from ibcore.report.formats import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="console (the default), markdown (a GitHub table), csv (mean and std in columns of their own) or "
        "latex (a booktabs tabular, best values in \\textbf)",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the table to FILE instead of stdout; without --format, its extension names the format "
        "(.md, .csv, .tex, .txt)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ib",
        description="Compare class-imbalance (long-tail) methods on equal footing; add new ones as plugins.",
    )
    parser.add_argument("--version", action="version", version=f"ibcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("list", help="list installed components", description="List installed components.")
    kinds = kind_names()
    choices = sorted(set(kinds) | {get_kind(k).plural for k in kinds})
    p.add_argument("kind", nargs="?", choices=choices, metavar="KIND", help=f"one of: {', '.join(kinds)}")
    p.add_argument("pattern", nargs="?", help="shell-style name pattern, e.g. 'resnet*'")
    p.add_argument("--citations", action="store_true", help="show the paper of each component")
    _add_plugin_options(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "plugins",
        help="plugin distributions and their load status",
        description="Show every distribution that provides components, its version and load errors.",
    )
    _add_plugin_options(p)
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "validate",
        help="check configs without running them",
        description="Validate experiment configs; exit 1 and print every error if any is invalid.",
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a value")
    p.add_argument(
        "--print",
        action="store_true",
        help="print each valid config as resolved (extends merged, overrides applied, every default filled in) "
        "as YAML on stdout, as `ib run` writes it to config.yaml; the report goes to stderr",
    )
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "schema",
        help="JSON Schema of the config format",
        description="Export a JSON Schema of the config, including every installed component's params.",
    )
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    _add_plugin_options(p)
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser(
        "run",
        help="train every run of an experiment",
        description="Validate CONFIG in full, then train all its runs together.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--out", help="parent folder of the run directory (overrides trainer.out_dir)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a value, e.g. trainer.epochs=5 or runs.ce.loss.params.gamma=2",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress display and no log lines (train.log keeps them); the final table is printed",
    )
    p.add_argument(
        "--smoke",
        nargs="?",
        type=_positive_int,
        const=2,
        metavar="N",
        help="a quick check of the whole config: N batches (default 2) of the first epoch, of each stage's first "
        "epoch and of the last, one evaluation; writes a full run directory; the numbers mean nothing",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="RUN[,RUN]",
        help="train only these runs of the config (with all their seeds), e.g. --only ce,ldam_drw",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "resume",
        help="continue an interrupted experiment",
        description="Resume RUN_DIR from its latest valid checkpoint to the same final numbers.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress display and no log lines (train.log keeps them); the final table is printed",
    )
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser(
        "report",
        help="re-render tables and plots of a run directory",
        description="Re-render results tables (and plots, with matplotlib) from RUN_DIR's files. With --format or "
        "--output, only the last-epoch table is written, in that format; RUN_DIR is then only read.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_format_options(p)
    p.add_argument(
        "--html",
        action="store_true",
        help="also write RUN_DIR/report.html: one self-contained page (tables, figures, config, environment)",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "compare",
        help="the results of several experiments in one table",
        description="One table of every method of each RUN_DIR (mean ± std over seeds), with the experiment it "
        "comes from; warns when the experiments were trained or tested on different data.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    _add_format_options(p)
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    err = _console(stderr=True)
    with warnings.catch_warnings(), _output_survives_a_closed_pipe():
        warnings.simplefilter("always", RegistryWarning)
        warnings.showwarning = lambda message, *_a, **_k: err.print(f"[yellow]warning:[/yellow] {escape(str(message))}")
        try:
            return func(args)
        except ConfigError as exc:
            _print_config_error(exc, err)
            return 1
        except IbError as exc:
            if os.environ.get("IB_DEBUG"):
                raise
            err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
            return 1
        except SystemExit as exc:  # ibcore never exits from inside a command: plugin code called sys.exit()
            if os.environ.get("IB_DEBUG"):
                raise
            err.print(
                f"[red]error:[/red] sys.exit({escape(repr(exc.code))}) was called inside `ib {escape(args.command)}` "
                "(by plugin code?); the command stopped there",
                highlight=False,
            )
            return 1
        except KeyboardInterrupt as exc:
            # The engine says how to continue once a run directory exists (ibcore.engine.RunInterrupted).
            signal_name = getattr(exc, "signal_name", None)
            if getattr(exc, "run_dir", None) is not None:
                message = str(exc)
            else:
                message = f"interrupted by {signal_name}" if signal_name else "interrupted"
            err.print(message, markup=False, soft_wrap=True)  # never broken inside the command to copy
            if signal_name is not None and hasattr(signal, signal_name):
                return 128 + int(getattr(signal, signal_name))
            return 130


if __name__ == "__main__":
    sys.exit(main())
