"""What a person sees while training: live bars on a terminal, plain progress lines otherwise.

On a terminal, two rich bars (epochs, and batches of the current epoch) stay within the console's width:
their last column, the epoch's time or the throughput, is cut before the bar, the counts or the ETA.
Without a terminal (output piped to a file, a batch job), a plain line says how far the epoch is, every
``progress_every_s`` seconds of work (and every ``progress_every_batches`` batches, if set). ``quiet``
prints nothing at all. Every log line also goes to ``log_path`` with a timestamp, whatever the mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from rich.table import Column

from ibcore.files import append_text


def _clock_text(seconds: float) -> str:
    """``1:05`` or ``2:01:05``."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay:
    """Epoch and batch progress with throughput and ETA: bars on a terminal, plain lines without one,
    nothing on the console when ``quiet`` (``train.log`` still gets every log line)."""

    def __init__(
        self,
        quiet: bool,
        log_path: Path,
        *,
        console: Console | None = None,
        progress_every_s: float = 60.0,
        progress_every_batches: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console or Console(highlight=False)
        self.quiet = quiet
        self.log_path = log_path
        self.live = not quiet and self.console.is_terminal
        self.plain = not quiet and not self.live  # periodic progress lines instead of bars
        self.progress_every_s = progress_every_s
        self.progress_every_batches = progress_every_batches
        self.clock = clock
        self.progress: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        self._markup = Console()  # renders a message's markup to plain text for train.log
        self.images = 0
        self.epoch = 0
        self.epochs = 0
        self.batches = 0
        self.total_batches = 0
        self.started = self.clock()
        self.last_line = self.started

    def _ensure(self, epochs: int) -> None:
        if not self.live or self.progress is not None:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            # Last, and cut rather than wrapped: however long, it never pushes the bar or the ETA away.
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=self.console,
            transient=False,
        )
        self.epoch_task = self.progress.add_task("epochs", total=epochs, info="")
        self.batch_task = self.progress.add_task("batches", total=1, info="")
        self.progress.start()

    def log(self, message: str) -> None:
        """A line for train.log (timestamped) and, unless quiet, the console (rich markup allowed)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        append_text(self.log_path, f"{stamp} {self._markup.render_str(message).plain}\n")
        if not self.quiet:  # one line per message, also in a file: the terminal wraps it, rich does not
            (self.progress.console if self.progress else self.console).print(message, soft_wrap=True)

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        """``epoch`` is the 0-based index of the epoch starting now; shown as ``epoch + 1``."""
        self._ensure(epochs)
        self.images = 0
        self.epoch, self.epochs = epoch, epochs
        self.batches, self.total_batches = 0, batches
        self.started = self.last_line = self.clock()
        if self.progress is not None and self.batch_task is not None and self.epoch_task is not None:
            self.progress.reset(self.batch_task, total=batches, info="")
            self.progress.update(self.epoch_task, completed=epoch)

    def advance(self, images: int) -> None:
        self.images += images
        self.batches += 1
        now = self.clock()
        rate = self.images / max(now - self.started, 1e-9)
        if self.progress is not None and self.batch_task is not None:
            self.progress.update(self.batch_task, advance=1, info=f"{rate:,.0f} img/s")
        elif self.plain and self.batches < self.total_batches and self._line_due(now):
            self.last_line = now
            elapsed = now - self.started
            left = elapsed / self.batches * (self.total_batches - self.batches)
            self.console.print(
                f"epoch {self.epoch + 1}/{self.epochs}: batch {self.batches}/{self.total_batches} "
                f"({100 * self.batches // max(self.total_batches, 1)}%), {rate:,.0f} img/s, "
                f"{_clock_text(elapsed)} elapsed, {_clock_text(left)} left",
                markup=False,
                soft_wrap=True,  # one line in a log file, however narrow the console
            )

    def _line_due(self, now: float) -> bool:
        every = self.progress_every_batches
        return bool(every and self.batches % every == 0) or now - self.last_line >= self.progress_every_s

    def end_epoch(self, epoch: int, epochs: int, seconds: float, summary: str) -> None:
        if self.progress is not None and self.epoch_task is not None:
            self.progress.update(self.epoch_task, completed=epoch + 1, info=f"last epoch {seconds:.1f}s")
        self.log(f"epoch {epoch + 1}/{epochs}: {summary}")

    def print(self, renderable: Any) -> None:
        """The results table at the end (nothing when quiet)."""
        self.stop()
        if not self.quiet:
            self.console.print(renderable)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
