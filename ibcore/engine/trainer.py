"""The trainer: every run of an experiment trained together, over shared batches where samplers agree.

Randomness is a pure function of (seed, epoch, names): samplers, augmentation and mixers get
generators derived from them, and the global torch RNG is re-seeded at every epoch. Checkpoints are
taken at epoch boundaries, so a resumed experiment reaches the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ibcore import __version__
from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.context import BuildContext
from ibcore.engine import checkpoint as ckpt
from ibcore.engine.batches import DeviceData, LoaderData, make_data
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.runs import RunState, effective_specs, spec_key
from ibcore.engine.seeding import derive_seed
from ibcore.errors import DataError, TrainingError
from ibcore.report import read_metrics, write_plots, write_tables
from ibcore.report.tables import console_table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"trainer.device is {name!r} but CUDA is not available on this machine; use 'auto'.")
    return device


@dataclasses.dataclass
class Results:
    """What ``ibcore.run`` returns: the run directory and one row per run (and post-hoc variant)."""

    run_dir: Path
    rows: list[dict[str, Any]]
    best_rows: list[dict[str, Any]]

    def row(self, run: str) -> dict[str, Any]:
        for row in self.rows:
            if row["run"] == run:
                return row
        raise KeyError(run)


class Trainer:
    """Trains the runs of one experiment in one process (the plain, sequential reference path)."""

    def __init__(self, experiment: Experiment, run_dir: Path, *, quiet: bool = False) -> None:
        self.experiment = experiment
        self.run_dir = run_dir
        self.quiet = quiet
        self.seed = experiment.seed
        self.epochs = experiment.trainer.epochs
        self.device = resolve_device(experiment.trainer.device)
        self.display = ProgressDisplay(quiet=quiet, log_path=run_dir / "train.log")
        self.bf16 = experiment.trainer.precision == "bf16" and self.device.type == "cuda"

        torch.manual_seed(derive_seed(self.seed, "dataset"))
        dataset_spec = experiment.data.dataset
        base = BuildContext(
            epochs=self.epochs, device=str(self.device), seed=self.seed, batch_size=experiment.data.batch_size
        )
        self.dataset = build("dataset", dataset_spec.name, dataset_spec.params, context=base)
        train = self.dataset.train
        self.num_classes = int(self.dataset.num_classes)
        counts = [int(c) for c in train.class_counts]
        if len(counts) != self.num_classes:
            raise DataError(
                f"dataset {dataset_spec.name!r} reports {len(counts)} class counts for {self.num_classes} classes"
            )
        empty = [c for c, n in enumerate(counts) if n == 0]
        if empty:
            raise DataError(f"dataset {dataset_spec.name!r}: classes {empty} have no training images")
        self.context = base.replace(num_classes=self.num_classes, class_counts=tuple(counts), targets=train.targets)
        mode = experiment.trainer.data_on_device
        self.train_data = make_data(train, self.device, mode, experiment.data.num_workers)
        self.test_data = make_data(self.dataset.test, self.device, mode, experiment.data.num_workers)
        val = getattr(self.dataset, "val", None)
        self.val_data = make_data(val, self.device, mode, experiment.data.num_workers) if val is not None else None
        where = "on the device, augmented there" if isinstance(self.train_data, DeviceData) else "via a DataLoader"
        self.display.log(
            f"data: {len(self.train_data)} training images {where}; {self.num_classes} classes; class counts {counts}"
        )

        self.runs = [RunState(run, self.context, self.seed, self.device) for run in experiment.runs]
        self.samplers: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.start_epoch = 0
        from ibcore.engine.fused import FusedTrainer

        self.fused = FusedTrainer.plan(self)

    # -- samplers and batching ------------------------------------------------------------------

    def sampler(self, spec: Any) -> Any:
        """The sampler built from ``spec`` (one per distinct spec, shared by the runs that name it)."""
        key = spec_key(spec)
        if key not in self.samplers:
            self.samplers[key] = build("sampler", spec.name, spec.params, context=self.context)
        return self.samplers[key]

    def iters_per_epoch(self, sampler: Any) -> int:
        n, batch = len(sampler), self.experiment.data.batch_size
        return n // batch if self.experiment.data.drop_last else math.ceil(n / batch)

    def _configure_runs(self, epoch: int, transition: bool) -> None:
        for run in self.active_runs():
            # The sampler decides the epoch length, which per-iteration schedules need.
            sampler = self.sampler(effective_specs(run.config, epoch).sampler)
            run.configure(epoch, self.epochs, self.iters_per_epoch(sampler), transition)

    def active_runs(self) -> list[RunState]:
        return [run for run in self.runs if run.failed is None]

    # -- one step --------------------------------------------------------------------------------

    def train_step(
        self,
        run: RunState,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        step: int,
        iters: int,
        generator: torch.Generator,
    ) -> None:
        """One optimisation step of one run (the reference the fused path is tested against)."""
        assert run.optimizer is not None
        run.set_lr(epoch, step, iters)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.compute_loss(run, x, y, epoch, generator)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.record_loss(loss, step)

    def compute_loss(
        self, run: RunState, x: torch.Tensor, y: torch.Tensor, epoch: int, generator: torch.Generator
    ) -> torch.Tensor:
        mixer = run.mixer if run.mixer is not None and run.mixer.active(epoch) else None
        if mixer is None:
            return run.loss(_full_precision(run.model(x)), y)
        plan = mixer.plan(x, y, generator)
        plan.permutation = plan.permutation.to(x.device)
        plan.target_weight = plan.target_weight.to(device=x.device, dtype=torch.float32)
        if plan.layer == 0:
            logits = run.model(mixer.mix(x, plan))
        else:
            logits = run.model.forward_mixed(x, plan.layer, lambda h: mixer.mix(h, plan))  # type: ignore[operator]
        logits = _full_precision(logits)
        return run.loss(logits, y, plan.target_weight) + run.loss(logits, y[plan.permutation], 1.0 - plan.target_weight)

    # -- epochs ----------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> None:
        groups: dict[str, list[RunState]] = defaultdict(list)
        for run in self.active_runs():
            assert run.specs is not None
            groups[spec_key(run.specs.sampler)].append(run)
        batch_size = self.experiment.data.batch_size
        total = sum(self.iters_per_epoch(self.samplers[key]) for key in groups)
        self.display.start_epoch(epoch, self.epochs, total)
        torch.manual_seed(derive_seed(self.seed, "epoch", epoch))
        for run in self.active_runs():
            run.train_mode()  # evaluation left the models in eval mode
        for key, members in groups.items():
            sampler = self.samplers[key]
            order = sampler.indices(epoch)
            iters = self.iters_per_epoch(sampler)
            data_generator = torch.Generator(device=self.device if isinstance(self.train_data, DeviceData) else "cpu")
            data_generator.manual_seed(derive_seed(self.seed, "augment", key, epoch))
            mixer_generators = {run.name: run.mixer_generator(epoch) for run in members}
            batches = self.train_data.iterate(order, batch_size, data_generator, True, self.experiment.data.drop_last)
            for step, (x, y) in enumerate(batches):
                if self.device.type == "cuda" and self.experiment.trainer.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                handled = self.fused.step(members, x, y, epoch, step, iters, mixer_generators) if self.fused else set()
                for run in members:
                    if run.name not in handled:
                        self.train_step(run, x, y, epoch, step, iters, mixer_generators[run.name])
                self.display.advance(len(y))

    def fit(self) -> Results:
        trainer_cfg = self.experiment.trainer
        self._write_meta()
        for epoch in range(self.start_epoch, self.epochs):
            started = time.perf_counter()
            self._configure_runs(epoch, transition=True)
            if self.fused:
                self.fused.sync_from_runs(self.active_runs())
            self.train_epoch(epoch)
            if self.fused:
                self.fused.sync_to_runs()
            seconds = time.perf_counter() - started
            self._end_epoch(epoch, seconds)
            last = epoch + 1 == self.epochs
            if (epoch + 1) % trainer_cfg.eval_every == 0 or last:
                self.evaluate(epoch)
            if (epoch + 1) % trainer_cfg.checkpoint_every == 0 or last:
                self.save(epoch + 1)
            if not self.active_runs():
                self.display.log("every run has failed; stopping")
                break
        self.display.stop()
        return self.finish()

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        losses = []
        for run in self.active_runs():
            mean, bad = run.end_epoch()
            line = {
                "split": "train",
                "run": run.name,
                "epoch": epoch,
                "train_loss": mean,
                "lr": run.optimizer.param_groups[0]["lr"] if run.optimizer else None,
                "seconds": seconds,
            }
            if bad >= 0:
                run.failed = f"non-finite loss at epoch {epoch}, batch {bad}"
                line["failed"] = run.failed
                self.display.log(f"[red]run {run.name!r} stopped: {run.failed}[/red]; the other runs go on")
            self._append_metrics(line)
            losses.append(f"{run.name}={mean:.4f}")
        images = sum(len(self.samplers[k]) for k in {spec_key(r.specs.sampler) for r in self.runs if r.specs})
        self.display.end_epoch(
            epoch,
            self.epochs,
            seconds,
            f"{seconds:.1f}s, {images / max(seconds, 1e-9):.0f} img/s; loss " + " ".join(losses),
        )

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate_split(self, run: RunState, data: DeviceData | LoaderData) -> dict[str, dict[str, Any]]:
        """Metrics of ``run`` on ``data``: raw, and with each post-hoc adjustment of the run."""
        variants: dict[str, tuple[Any, list[Any]]] = {run.name: (None, self._evaluators())}
        for spec in run.config.posthoc:
            adjustment = build("adjustment", spec.name, spec.params, context=self.context)
            variants[f"{run.name}+{spec.name}"] = (adjustment, self._evaluators())
        model = run.model
        model.eval()
        eval_batch = self.experiment.data.eval_batch_size or 2 * self.experiment.data.batch_size
        order = torch.arange(len(data)).numpy()
        for x, y in data.iterate(order, eval_batch, None, False, False):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                features = model.features(x)  # type: ignore[operator]
                logits = model.classifier(features)  # type: ignore[operator]
            features, logits = features.float(), logits.float()
            for adjustment, evaluators in variants.values():
                adjusted = logits if adjustment is None else adjustment(model, features, logits)
                for evaluator in evaluators:
                    evaluator.update(adjusted, y)
        results = {}
        for name, (_, evaluators) in variants.items():
            merged: dict[str, Any] = {}
            for evaluator in evaluators:
                merged.update(evaluator.compute())
            results[name] = merged
        return results

    def _evaluators(self) -> list[Any]:
        return [build("evaluator", e.name, e.params, context=self.context) for e in self.experiment.evaluators]

    def evaluate(self, epoch: int) -> None:
        for run in self.active_runs():
            for variant, metrics in self._evaluate_split(run, self.test_data).items():
                self._append_metrics({"split": "test", "run": variant, "epoch": epoch, **metrics})
            if self.val_data is not None:
                for variant, metrics in self._evaluate_split(run, self.val_data).items():
                    self._append_metrics({"split": "val", "run": variant, "epoch": epoch, **metrics})
                    score = _headline(metrics)
                    if score is not None and score > self.best.get(variant, {}).get("score", -math.inf):
                        test = self._last_metrics("test", variant, epoch)
                        self.best[variant] = {"score": score, "epoch": epoch, "test": test}
        summary = []
        for run in self.active_runs():
            metrics = self._last_metrics("test", run.name, epoch)
            headline = _headline(metrics)
            if headline is not None:
                summary.append(f"{run.name}={headline:.2f}")
        if summary:
            self.display.log(f"epoch {epoch + 1}: test accuracy (%) " + " ".join(summary))

    # -- files -----------------------------------------------------------------------------------

    def _append_metrics(self, line: dict[str, Any]) -> None:
        self.history.append(line)
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, default=_json_default) + "\n")

    def _last_metrics(self, split: str, run: str, epoch: int) -> dict[str, Any]:
        for line in reversed(self.history):
            if line.get("split") == split and line.get("run") == run and line.get("epoch") == epoch:
                return {k: v for k, v in line.items() if k not in ("split", "run", "epoch")}
        return {}

    def _write_meta(self) -> None:
        meta = {
            "ibcore": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor(),
            "seed": self.seed,
            "num_classes": self.num_classes,
            "class_counts": list(self.context.class_counts or ()),
            "fused_groups": self.fused.describe() if self.fused else [],
        }
        ckpt.atomic_write_text(self.run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    def save(self, epoch: int) -> None:
        state = {
            "format": 1,
            "epoch": epoch,
            "runs": {
                run.name: {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict() if run.optimizer is not None else {},
                    "failed": run.failed,
                }
                for run in self.runs
            },
            "history": self.history,
            "best": self.best,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        ckpt.save_checkpoint(
            self.run_dir / "checkpoints", epoch, _plain(state), self.experiment.trainer.keep_checkpoints
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint taken after ``state['epoch']`` epochs; training continues from there."""
        epoch = int(state["epoch"])
        names = {run.name for run in self.runs}
        if set(state["runs"]) != names:
            raise TrainingError(f"the checkpoint holds runs {sorted(state['runs'])}, the config {sorted(names)}")
        for run in self.runs:
            saved = state["runs"][run.name]
            run.failed = saved["failed"]
            # Components as they were in the last finished epoch; the next epoch performs any stage start.
            sampler = self.sampler(effective_specs(run.config, epoch - 1).sampler)
            run.configure(epoch - 1, self.epochs, self.iters_per_epoch(sampler), transition=False)
            run.model.load_state_dict(saved["model"])
            if run.optimizer is not None and saved["optimizer"]:
                run.optimizer.load_state_dict(saved["optimizer"])
        self.history = list(state["history"])
        self.best = dict(state.get("best", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self.start_epoch = epoch
        # metrics.jsonl may hold lines written after this checkpoint: rewrite it from the history.
        text = "".join(json.dumps(line, default=_json_default) + "\n" for line in self.history)
        ckpt.atomic_write_text(self.run_dir / "metrics.jsonl", text)
        self.display.log(f"resumed after epoch {epoch} of {self.epochs}")

    def finish(self) -> Results:
        self._write_meta()
        rows, best_rows = [], []
        for run in self.runs:
            variants = [run.name] + [f"{run.name}+{spec.name}" for spec in run.config.posthoc]
            for variant in variants:
                evals = [m for m in self.history if m.get("split") == "test" and m.get("run") == variant]
                row: dict[str, Any] = {
                    "run": variant,
                    "status": "ok" if run.failed is None else f"failed: {run.failed}",
                }
                if evals:
                    last = evals[-1]
                    row["epoch"] = last["epoch"] + 1
                    row.update({k: v for k, v in last.items() if k not in ("split", "run", "epoch")})
                rows.append(row)
                if variant in self.best:
                    best = self.best[variant]
                    best_rows.append(
                        {"run": variant, "status": row["status"], "epoch": best["epoch"] + 1, **best["test"]}
                    )
        write_tables(self.run_dir, rows, best_rows)
        write_plots(
            self.run_dir, read_metrics(self.run_dir / "metrics.jsonl"), rows, list(self.context.class_counts or ())
        )
        self.display.print(console_table(rows, title=f"results after {self.epochs} epochs ({self.run_dir})"))
        return Results(self.run_dir, rows, best_rows)


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Losses see float32 logits under bf16 autocast (and float64 when a test runs in float64)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _headline(metrics: dict[str, Any]) -> float | None:
    for key in ("acc@1 (%)", "balanced_acc (%)"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


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
