"""What a training leaves behind: metrics.jsonl and the history, meta.json, checkpoints, and the results.

The history (every metrics line) and the best validation epochs live here; checkpoints hold them with
every run's model and optimizer, so ``ib resume`` continues from the same records.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from ibcore import __version__
from ibcore.engine import checkpoint as ckpt
from ibcore.engine.distributed import Distributed, check_resume_world
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.runs import RunState
from ibcore.errors import TrainingError
from ibcore.files import append_text, finite_json
from ibcore.report import METRICS_FORMAT, PLOTS_HINT, read_metrics, write_plots, write_tables
from ibcore.report.console import console_table
from ibcore.report.grid import grid_notes
from ibcore.report.html import write_html_report
from ibcore.report.labels import display_label, labels_to_keys
from ibcore.report.plots import matplotlib_available
from ibcore.report.results import Results
from ibcore.report.tables import metric_columns


class Records:
    """The metrics history and best epochs of every run, and the files made from them (rank 0 writes)."""

    def __init__(self, run_dir: Path, dist: Distributed, display: ProgressDisplay, labels: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.dist = dist
        self.display = display
        self.labels = labels
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # told every new line (the loggers)

    # -- metrics ---------------------------------------------------------------------------------

    def append(self, line: dict[str, Any]) -> None:
        line = finite_json(line)  # strict JSON everywhere: a NaN metric is null, with the reason kept
        self.history.append(line)  # on every rank: all of them keep the same history
        if self.dist.is_main:
            append_text(self.run_dir / "metrics.jsonl", json.dumps(line, default=_json_default) + "\n")
            for listener in self.listeners:
                listener(line)

    def train_epoch(
        self, completed: int, active: Sequence[RunState], own: set[str], seconds: float
    ) -> tuple[float, list[str]]:
        """One training line per active run after ``completed`` epochs; a run whose loss turned non-finite is
        marked failed. Returns the slowest rank's seconds and ``name=loss`` texts for the log."""
        local = {}
        for run in active:
            if run.name in own:
                mean, bad = run.end_epoch()
                local[run.name] = (mean, bad, run.optimizer.param_groups[0]["lr"] if run.optimizer else None)
        # Every rank learns every run's epoch: the mean over ranks of the losses (equal slices under
        # data_parallel), the first non-finite step on any rank, and the slowest rank's time.
        gathered = self.dist.all_gather_object((local, seconds))
        seconds = max(part[1] for part in gathered)
        losses = []
        for run in active:
            parts = [part[0][run.name] for part in gathered if run.name in part[0]]
            mean = sum(p[0] for p in parts) / len(parts)
            bad = min([p[1] for p in parts if p[1] >= 0], default=-1)
            # epochs completed: every epoch number a user reads counts them
            line = {"split": "train", "run": run.name, "epoch": completed, "train_loss": mean, "lr": parts[0][2]}
            line["seconds"] = seconds
            if bad >= 0:  # the epoch and the batch as ordinals: the 1st epoch, its 4th batch
                run.failed = f"non-finite loss at epoch {completed}, batch {bad + 1}"
                line["failed"] = run.failed
                self.display.log(f"[red]run {run.name!r} stopped: {escape(run.failed)}[/red]; the other runs go on")
            self.append(line)
            losses.append(f"{run.name}={mean:.4f}")
        return seconds, losses

    def last(self, split: str, run: str, epoch: int) -> dict[str, Any]:
        for line in reversed(self.history):
            if line.get("split") == split and line.get("run") == run and line.get("epoch") == epoch:
                return {k: v for k, v in line.items() if k not in ("split", "run", "epoch")}
        return {}

    def evaluation(self, split: str, variant: str, epoch: int, metrics: dict[str, Any], score: float | None) -> None:
        """One evaluation line; a validation ``score`` above the variant's best makes this epoch its best."""
        self.append({"split": split, "run": variant, "epoch": epoch, **metrics})
        if split == "val" and score is not None and score > self.best.get(variant, {}).get("score", -math.inf):
            self.best[variant] = {"score": score, "epoch": epoch, "test": self.last("test", variant, epoch)}

    def write_meta(self, meta: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        environment = {
            "ibcore": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }
        ckpt.atomic_write_text(self.run_dir / "meta.json", json.dumps({**environment, **meta}, indent=2) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, epoch: int, runs: Sequence[RunState], own: set[str], keep: int) -> None:
        """Rank 0 writes one checkpoint holding every run (under runs_parallel, gathered from their owners)."""
        if self.dist.splits_runs:
            self._gather_run_states(runs, own)
        rng_per_rank = self.dist.all_gather_object(torch.get_rng_state()) if self.dist.enabled else None
        if not self.dist.is_main:
            return
        state = {
            "format": 1,
            "metrics_format": METRICS_FORMAT,  # the history's epochs count completed epochs
            "epoch": epoch,
            "distributed": {"world_size": self.dist.world_size, "mode": self.dist.mode},
            "runs": {
                run.name: {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict() if run.optimizer is not None else {},
                    "failed": run.failed,
                }
                for run in runs
            },
            "history": self.history,
            "best": self.best,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **({"torch_per_rank": rng_per_rank} if rng_per_rank is not None else {}),
            },
        }
        directory = self.run_dir / "checkpoints"
        try:
            ckpt.save_checkpoint(directory, epoch, _plain(state), keep)
        except OSError as exc:  # disk full, quota, permissions
            raise TrainingError(
                f"cannot write the checkpoint {directory / f'epoch-{epoch:04d}.pt'}: {exc.strerror or exc}; "
                "the previous checkpoint is intact, free space and run `ib resume` on the run directory"
            ) from exc

    def _gather_run_states(self, runs: Sequence[RunState], own: set[str]) -> None:
        """runs_parallel: copy every run's model and optimizer state from its owner into rank 0's copy."""
        mine = {
            run.name: {
                "model": _to_cpu(run.model.state_dict()),
                "optimizer": _to_cpu(run.optimizer.state_dict()) if run.optimizer is not None else {},
            }
            for run in runs
            if run.name in own
        }
        parts = self.dist.gather_object(mine)
        if parts is None:
            return
        by_name = {run.name: run for run in runs}
        for part in parts[1:]:  # rank 0's own runs are in place already
            for name, saved in part.items():
                run = by_name[name]
                run.model.load_state_dict(saved["model"])
                if run.optimizer is not None and saved["optimizer"]:
                    run.optimizer.load_state_dict(saved["optimizer"])

    def restore(
        self, state: dict[str, Any], runs: Sequence[RunState], configure: Callable[[RunState, int], None]
    ) -> int:
        """Load a checkpoint taken after ``state['epoch']`` epochs into ``runs`` (each first configured, by
        ``configure(run, epoch)``, as it was in the last finished epoch) and into the records; returns the epoch.

        Under torchrun every rank loads the same checkpoint, which must come from as many processes
        in the same mode; each rank gets its own RNG state back.
        """
        path = ckpt.loaded_from(state)
        ckpt.check_structure(state, path, complete=True)
        check_resume_world(state, self.dist, self.run_dir)
        epoch = int(state["epoch"])
        names = {run.name for run in runs}
        if set(state["runs"]) != names:
            raise TrainingError(f"the checkpoint holds runs {sorted(state['runs'])}, the config {sorted(names)}")
        for run in runs:
            saved = state["runs"][run.name]
            run.failed = saved["failed"]
            configure(run, epoch - 1)  # the next epoch performs any stage start
            ckpt.load_run_state(run.model, saved["model"], run=run.name, path=path)
            if run.optimizer is not None and saved["optimizer"]:
                ckpt.load_optimizer_state(run.optimizer, saved["optimizer"], run=run.name, path=path)
        self.history = list(state["history"])
        self.best = dict(state.get("best", {}))
        if state.get("metrics_format") != METRICS_FORMAT:
            # Written by an older ibcore: epochs counted from 0, metrics named by their labels ("acc@1 (%)").
            self.history = [{**labels_to_keys(line, self.labels), "epoch": line["epoch"] + 1} for line in self.history]
            self.best = {
                name: {**best, "epoch": best["epoch"] + 1, "test": labels_to_keys(best.get("test", {}), self.labels)}
                for name, best in self.best.items()
            }
        per_rank = state["rng"].get("torch_per_rank")
        if self.dist.enabled and per_rank:
            ckpt.restore_rng(per_rank[self.dist.rank], path, what=f"rng['torch_per_rank'][{self.dist.rank}]")
        else:
            ckpt.restore_rng(state["rng"]["torch"], path)
        if self.dist.is_main:
            # metrics.jsonl may hold lines written after this checkpoint: rewrite it from the history.
            text = "".join(json.dumps(line, default=_json_default) + "\n" for line in self.history)
            ckpt.atomic_write_text(self.run_dir / "metrics.jsonl", text)
        return epoch

    # -- results ---------------------------------------------------------------------------------

    def results(self, runs: Sequence[RunState], class_counts: list[int], title: str) -> Results:
        """The final rows (last evaluation, and best validation epoch) of every run and post-hoc variant; rank 0
        writes the tables and plots and prints the table."""
        rows, best_rows = [], []
        for run in runs:
            variants = [(None, run.config.reference)] + [(spec.name, spec.reference) for spec in run.config.posthoc]
            for adjustment, given in variants:
                reference = labels_to_keys(given, self.labels) if given else None  # "acc@1 (%)" names acc1
                variant = run.repeat.variant(adjustment)
                evals = [m for m in self.history if m.get("split") == "test" and m.get("run") == variant]
                row: dict[str, Any] = {
                    "run": variant,
                    "method": run.method if adjustment is None else f"{run.method}+{adjustment}",
                    "seed": run.seed,
                    "status": "ok" if run.failed is None else f"failed: {run.failed}",
                }
                if evals:
                    last = evals[-1]
                    row["epoch"] = last["epoch"]
                    row.update({k: v for k, v in last.items() if k not in ("split", "run", "epoch")})
                if reference:
                    row["reference"] = reference
                rows.append(row)
                if variant in self.best:
                    best = self.best[variant]
                    best_row = {k: row[k] for k in ("run", "method", "seed", "status")}
                    best_row.update({"epoch": best["epoch"], **best["test"]})
                    if reference:
                        best_row["reference"] = reference
                    best_rows.append(best_row)
        self._check_references(rows)
        results = Results(self.run_dir, rows, best_rows, list(self.history), dict(self.labels))
        if not self.dist.is_main:
            return results
        write_tables(self.run_dir, rows, best_rows, self.labels)
        write_plots(self.run_dir, read_metrics(self.run_dir / "metrics.jsonl"), rows, class_counts)
        if not matplotlib_available():
            self.display.log(f"[yellow]{escape(PLOTS_HINT)}[/yellow]")
        write_html_report(self.run_dir)
        self.display.print(console_table(rows, title=f"{title} ({self.run_dir})", labels=self.labels))
        for note in grid_notes(rows, best_rows, self.labels):
            self.display.log(escape(note))
        return results

    def _check_references(self, rows: list[dict[str, Any]]) -> None:
        """Say once per method when a published value names no metric of the results (a typo would hide it)."""
        measured = metric_columns(rows)
        said = set()
        for row in rows:
            unknown = [k for k in row.get("reference", {}) if k != "source" and k not in measured]
            if unknown and row["method"] not in said:
                said.add(row["method"])
                self.display.log(
                    f"[yellow]{escape(row['method'])}: reference {escape(', '.join(map(repr, unknown)))} is no "
                    f"metric of the results; they are {escape(', '.join(map(repr, measured)))} (or their labels "
                    f"{escape(', '.join(repr(display_label(m, self.labels)) for m in measured))})[/yellow]"
                )


def _to_cpu(value: Any) -> Any:
    """A state dict with every tensor on the CPU (to send it to another rank)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _plain(value: Any) -> Any:
    """Make a state loadable with ``weights_only=True``: only tensors, numbers, strings and containers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
