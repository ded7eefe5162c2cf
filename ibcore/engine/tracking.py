"""Experiment trackers (``loggers:``) fed from the metrics lines, on a background thread.

Every line the records append (metrics.jsonl) is handed to each logger, in order, by one worker thread, so a
slow tracker never slows training. A logger that raises is reported once and switched off; the others and the
training go on. What a logger needs to continue its tracker runs after ``ib resume`` (run ids) is kept in
``loggers.json`` in the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ibcore.build import build
from ibcore.config.schema import Experiment, resolved_config
from ibcore.context import BuildContext
from ibcore.engine import checkpoint as ckpt
from ibcore.engine.runs import RunState
from ibcore.protocols import Logger, LogSession
from ibcore.registry import describe_plugin_exception

STATE_FILE = "loggers.json"
_DONE = object()


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of the resolved config (tags a tracker run with the exact experiment)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line, named ``train/loss``, ``train/lr`` or ``<split>/<key>``."""
    split = line.get("split", "train")
    out = {}
    for key, value in line.items():
        if key in ("split", "run", "epoch", "seconds", "failed") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            name = {"train_loss": "loss"}.get(key, key)
            out[f"{split}/{name}"] = float(value)
    return out


class Trackers:
    """The experiment's loggers behind one queue and one worker thread."""

    def __init__(self, loggers: Mapping[str, Logger], run_dir: Path, say: Callable[[str], None]) -> None:
        self.loggers = dict(loggers)  # "loggers[i] (name)" -> logger
        self.run_dir = run_dir
        self.say = say
        self.failed: set[str] = set()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="ibcore-loggers", daemon=True)
        self.worker.start()

    def start(self, session: LogSession) -> None:
        self.queue.put(("start", session))

    def line(self, line: Mapping[str, Any]) -> None:
        metrics = scalars(line)
        if metrics and isinstance(line.get("run"), str) and isinstance(line.get("epoch"), int):
            self.queue.put(("log", (line["run"], line["epoch"], metrics)))

    def finish(self, rows: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None:
        self.queue.put(("finish", (list(rows), list(files))))

    def close(self, timeout: float = 300.0) -> None:
        """Let the worker finish what is queued (at most ``timeout`` seconds: a hung tracker cannot hold the
        process; what it had not sent is in metrics.jsonl)."""
        self.queue.put(_DONE)
        self.worker.join(timeout)
        if self.worker.is_alive():
            self.say(
                f"[yellow]loggers: still busy after {timeout:.0f} s; stopped waiting (metrics.jsonl is "
                "complete)[/yellow]"
            )

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            what, payload = item
            for name, logger in self.loggers.items():
                if name in self.failed:
                    continue
                try:
                    if what == "start":
                        self._start(name, logger, payload)
                    elif what == "log":
                        logger.log(*payload)
                    else:
                        logger.finish(*payload)
                except BaseException as exc:  # a tracker's failure must never reach training
                    self.failed.add(name)
                    self.say(
                        f"[yellow]{name} failed while it was asked to {what} ({describe_plugin_exception(exc)}); it is "
                        "switched off for the rest of this training, metrics.jsonl has every value[/yellow]"
                    )

    def _start(self, name: str, logger: Logger, session: LogSession) -> None:
        path = self.run_dir / STATE_FILE
        try:
            saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, ValueError):
            saved = {}
        mine = saved.get(name, {}) if isinstance(saved, dict) else {}
        state = logger.start(LogSession(**{**session.__dict__, "state": mine if isinstance(mine, dict) else {}}))
        if state:
            saved = saved if isinstance(saved, dict) else {}
            saved[name] = dict(state)
            ckpt.atomic_write_text(path, json.dumps(saved, indent=2, default=str) + "\n")


def make_trackers(
    specs: Sequence[Any], context: BuildContext, run_dir: Path, say: Callable[[str], None]
) -> Trackers | None:
    """The experiment's loggers (built and checked by preflight already), or None without any."""
    if not specs:
        return None
    loggers = {
        f"loggers[{i}] ({spec.name})": build("logger", spec.name, spec.params, context=context)
        for i, spec in enumerate(specs)
    }
    return Trackers(loggers, run_dir, say)


def session_of(experiment: Experiment, run_dir: Path, runs: Sequence[RunState], epoch: int) -> LogSession:
    """What the loggers are told at the start: every trained run and post-hoc variant, the resolved config."""
    entries: list[dict[str, Any]] = []
    for run in runs:
        entries.append({"name": run.name, "method": run.method, "seed": run.seed})
        for spec in run.config.posthoc:
            name = run.repeat.variant(spec.name)
            entries.append({"name": name, "method": f"{run.method}+{spec.name}", "seed": run.seed})
    config = resolved_config(experiment)
    return LogSession(run_dir, run_dir.name, tuple(entries), config, config_hash(config), epoch > 0, {}, epoch)


def result_files(run_dir: Path) -> list[Path]:
    """The files a tracker attaches to its runs at the end: tables, plots and the resolved config."""
    names = ["results.md", "results.csv", "results.json", "summary.csv", "config.yaml", "meta.json"]
    return [run_dir / n for n in names if (run_dir / n).is_file()] + sorted(run_dir.glob("*.png"))
