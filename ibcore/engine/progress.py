"""What a person sees while training: a rich live display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    """Epoch and batch bars with throughput and ETA; ``quiet`` (or no TTY) prints only log lines.

    Every log line also goes to ``log_path`` with a timestamp, so epoch times are kept.
    """

    def __init__(self, quiet: bool, log_path: Path) -> None:
        self.console = Console(highlight=False)
        self.quiet = quiet
        self.log_path = log_path
        self.live = not quiet and self.console.is_terminal
        self.progress: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        self.images = 0
        self.started = time.perf_counter()

    def _ensure(self, epochs: int) -> None:
        if not self.live or self.progress is not None:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.epoch_task = self.progress.add_task("epochs", total=epochs, info="")
        self.batch_task = self.progress.add_task("batches", total=1, info="")
        self.progress.start()

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {Console().render_str(message).plain}\n")
        if not self.quiet or "stopped" in message or "failed" in message:
            (self.progress.console if self.progress else self.console).print(message)

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        self._ensure(epochs)
        self.images = 0
        self.started = time.perf_counter()
        if self.progress is not None and self.batch_task is not None and self.epoch_task is not None:
            self.progress.reset(self.batch_task, total=batches, info="")
            self.progress.update(self.epoch_task, completed=epoch)

    def advance(self, images: int) -> None:
        self.images += images
        if self.progress is not None and self.batch_task is not None:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.batch_task, advance=1, info=f"{rate:,.0f} img/s")

    def end_epoch(self, epoch: int, epochs: int, seconds: float, summary: str) -> None:
        if self.progress is not None and self.epoch_task is not None:
            self.progress.update(self.epoch_task, completed=epoch + 1, info=summary[-80:])
        self.log(f"epoch {epoch + 1}/{epochs}: {summary}")

    def print(self, renderable: Any) -> None:
        self.stop()
        self.console.print(renderable)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
