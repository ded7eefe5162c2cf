"""The trainer: every run of an experiment trained together, over shared batches where samplers agree.

It only loops; setup, batches (lanes), the training step (steps/), evaluation and records (metrics,
checkpoints, results) live in their own modules. Randomness is a pure function of (seed, epoch, names)
and the global torch RNG is re-seeded every epoch, so a resumed experiment reaches the same numbers as an
uninterrupted one. Under ``torchrun`` the same loop runs in every process (:mod:`ibcore.engine.distributed`).
"""

from __future__ import annotations

import itertools
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ibcore.config.schema import Experiment
from ibcore.context import BuildContext
from ibcore.engine.ddp import DataParallelModels
from ibcore.engine.distributed import Distributed
from ibcore.engine.evaluation import Evaluation
from ibcore.engine.experiment_data import check_same_seed_data, fingerprints, load_data
from ibcore.engine.lanes import Lanes
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.records import Records
from ibcore.engine.repeats import all_seeds, expand_runs
from ibcore.engine.runs import RunState, effective_specs
from ibcore.engine.seeding import derive_seed
from ibcore.engine.setup import (
    SilentDisplay,
    config_source,
    epochs_to_train,
    log_data,
    preflight,
    prepare_ranks,
    resolve_device,
    smoke_epochs,
)
from ibcore.engine.steps.fused import FusedStep, GraphRunner, fusable
from ibcore.engine.tracking import make_trackers, result_files, session_of
from ibcore.engine.views import RunView
from ibcore.errors import TrainingError
from ibcore.protocols import Batch
from ibcore.report import METRICS_FORMAT
from ibcore.report.results import Results


class Trainer:
    """Trains the runs of one experiment: in one process, or in one of several launched by ``torchrun``.

    ``graph_runner`` replaces the CUDA-graph runner of the fused step and turns graphs on whatever the
    device (a test injects one that runs the step eagerly).
    """

    def __init__(
        self,
        experiment: Experiment,
        run_dir: Path,
        *,
        quiet: bool = False,
        distributed: Distributed | None = None,
        smoke: int | None = None,
        graph_runner: Callable[..., GraphRunner] | None = None,
    ) -> None:
        settings = experiment.trainer
        self.experiment, self.run_dir, self.smoke = experiment, run_dir, smoke
        self.seed = experiment.seeds[0] if experiment.seeds else experiment.seed  # of the global stream
        self.epochs = settings.epochs
        self.dist = distributed or Distributed(mode=settings.distributed.mode)
        self.device = self.dist.device if self.dist.enabled and self.dist.device else resolve_device(settings.device)
        log_path = run_dir / "train.log"
        self.display = ProgressDisplay(quiet=quiet, log_path=log_path) if self.dist.is_main else SilentDisplay(log_path)
        self.bf16 = settings.precision == "bf16" and self.device.type == "cuda"
        if settings.precision == "bf16" and not self.bf16:
            self.display.log(
                f"[yellow]trainer.precision is bf16, but bf16 autocast is used only on CUDA: on {self.device.type} "
                "training and evaluation run in fp32[/yellow]"
            )
        base = BuildContext(
            epochs=self.epochs, device=str(self.device), seed=self.seed, batch_size=experiment.data.batch_size
        )
        self.data = load_data(experiment, all_seeds(experiment), self.device, base)
        first = next(iter(self.data.values()))
        self.context, self.num_classes = first.context, first.num_classes  # what every seed's data shares
        log_data(self.display, self.data)
        self.runs = [
            RunState(repeat, self.data[repeat.seed].context.replace(seed=repeat.seed), self.device)
            for repeat in expand_runs(experiment)
        ]
        preflight(experiment, self.context, self.runs, self.data, self.device, config_source(run_dir))
        self.evaluation = Evaluation(
            experiment, self.runs[0], dist=self.dist, device=self.device, bf16=self.bf16, smoke=smoke,
            num_classes=self.num_classes,
        )  # fmt: skip
        self.records = Records(run_dir, self.dist, self.display, self.evaluation.labels)
        for run in self.runs:
            if settings.channels_last:  # faster convolutions on GPUs and CPUs (1.4-1.7x for small_cnn on 2 cores)
                run.model.to(memory_format=torch.channels_last)
            if settings.compile:
                run.model.compile()  # in place: state_dict keys, checkpoints and hooks stay as they are
        self.lanes = Lanes(experiment.data, self.data, self.dist, settings.channels_last)
        self.data_fingerprint = fingerprints(self.data)  # kept in meta.json, compared by `ib resume`
        self.start_epoch = 0
        # The runs this process trains: all of them, except under runs_parallel (runs[rank::world]).
        owned = self.runs[self.dist.rank :: self.dist.world_size] if self.dist.splits_runs else self.runs
        self.own = {run.name for run in owned}
        self.ddp = DataParallelModels(self.dist, self.device)
        if self.dist.enabled:
            prepare_ranks(self.dist, self.runs, self.display, self.device, experiment.data.batch_size)
        self.trackers = (
            make_trackers(experiment.loggers, self.context, run_dir, self.display.log) if self.dist.is_main else None
        )
        if self.trackers is not None:
            self.records.listeners.append(self.trackers.line)
        self.fused_step = FusedStep.plan(
            settings, self.device, self.display.log, bf16=self.bf16, data_parallel=self.dist.splits_batches,
            graph_runner=graph_runner,
        )  # fmt: skip

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> Results:
        # Batch shapes are fixed, so cuDNN's autotuned convolution algorithms pay off (LDAM-DRW's code sets it
        # too). Only for this training: the caller's process gets its setting back.
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = previous or self.device.type == "cuda"
        try:
            return self._fit()
        finally:
            torch.backends.cudnn.benchmark = previous

    def _fit(self) -> Results:
        settings = self.experiment.trainer
        self._write_meta()
        if self.trackers is not None:
            self.trackers.start(session_of(self.experiment, self.run_dir, self.runs, self.start_epoch))
        epochs = epochs_to_train(self.experiment, self.smoke, self.start_epoch, self.display)
        for epoch in epochs:
            started = time.perf_counter()
            changed = self._configure_runs(epoch, transition=True)
            if self.dist.splits_batches:
                self.ddp.prepare(self.active_runs(), changed)
            self.train_epoch(epoch)
            if self.dist.splits_batches:
                for run in self.active_runs():
                    # BatchNorm running statistics were updated with each rank's own slice: keep rank 0's.
                    self.dist.broadcast_module(run.model, buffers_only=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the epoch's kernels are queued, not finished
            self._end_epoch(epoch, time.perf_counter() - started)
            last, scheduled = epoch + 1 == self.epochs, self.smoke is None
            if last or scheduled and (epoch + 1) % settings.eval_every == 0:
                self.evaluate(epoch)
            if last or scheduled and (epoch + 1) % settings.checkpoint_every == 0:
                self.records.save(epoch + 1, self.runs, self.own, settings.keep_checkpoints)
            if not self.active_runs():
                self.display.log("every run has failed; stopping")
                break
        self.display.stop()
        self.ddp.clear()
        return self.finish()

    def _configure_runs(self, epoch: int, transition: bool) -> set[str]:
        """Build every active run's components for ``epoch``; return the names of the runs that changed."""
        changed = set()
        for run in self.active_runs():
            # The sampler decides the epoch length, which per-iteration schedules need.
            sampler = self.lanes.sampler(run, effective_specs(run.config, epoch).sampler)
            if run.configure(epoch, self.epochs, self.lanes.iters(sampler), transition):
                changed.add(run.name)
        return changed

    def active_runs(self) -> list[RunState]:
        return [run for run in self.runs if run.failed is None]

    def own_active_runs(self) -> list[RunState]:
        """The active runs this process trains (all of them but under runs_parallel)."""
        return [run for run in self.runs if run.failed is None and run.name in self.own]

    def train_epoch(self, epoch: int) -> None:
        runs = self.own_active_runs()
        lanes = self.lanes.lanes(runs)
        self.display.start_epoch(epoch, self.epochs, sum(iters for _, iters in lanes))
        # Under data_parallel each rank draws its own dropout masks (and DataLoader augmentation).
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist.splits_batches else (0, 1)
        torch.manual_seed(derive_seed(self.seed, "epoch", epoch, *(("rank", rank) if world > 1 else ())))
        views = {run.name: self._view(run, epoch) for run in runs}
        if self.fused_step is not None:
            self.fused_step.regroup([views[run.name] for run in runs], {run.name for run in runs if fusable(run.step)})
        for (_, iters), groups in lanes.items():
            members = [run for group in groups.values() for run in group]
            streams = [
                self.lanes.batches(epoch, group, group_runs, (rank, world)) for group, group_runs in groups.items()
            ]
            for step, lane_batches in enumerate(itertools.islice(zip(*streams, strict=True), self.smoke)):
                batches = {name: batch for by_run in lane_batches for name, batch in by_run.items()}
                self._step(members, views, batches, epoch, step, iters)
                self.display.advance(sum(len(next(iter(b.values())).targets) for b in lane_batches) * world)
        if self.fused_step is not None:
            self.fused_step.write_back()

    def _view(self, run: RunState, epoch: int) -> RunView:
        """What the run's step sees this epoch; the run in train mode (evaluation left it in eval mode)."""
        run.train_mode()
        return RunView.of(run, epoch, self.lanes.lane_of(run), self.bf16, self.device.type, self.ddp.forward_of(run))

    def _step(
        self,
        runs: list[RunState],
        views: dict[str, RunView],
        batches: dict[str, Batch],
        epoch: int,
        step: int,
        iters: int,
    ) -> None:
        """One step of ``runs``: the fused step takes the standard-step runs it can stack, each other run its own."""
        for run in runs:
            run.set_lr(epoch, step, iters)
        stackable = [views[run.name] for run in runs if fusable(run.step)]
        losses = self.fused_step(stackable, batches) if self.fused_step is not None and stackable else {}
        for run in runs:
            if run.name not in losses:
                losses.update(self._own_step(run, views[run.name], batches, epoch, step))
            run.record_loss(losses[run.name], step)

    def _own_step(
        self, run: RunState, view: RunView, batches: dict[str, Batch], epoch: int, step: int
    ) -> dict[str, torch.Tensor]:
        assert run.step is not None
        try:
            return run.step([view], batches)
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            raise TrainingError(
                f"run {run.name!r}, epoch {epoch + 1}, batch {step + 1}: a batch of {len(batches[run.name].targets)} "
                "sample cannot go through BatchNorm in training; set data.drop_last: true (or change "
                "data.batch_size) so the last batch is not a single sample"
            ) from exc

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        seconds, losses = self.records.train_epoch(epoch + 1, self.active_runs(), self.own, seconds)
        images = self.lanes.images_per_epoch(self.runs)
        cuda = self.device.type == "cuda"  # the device's memory, where it is the limit
        memory = (
            f", {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB peak on {self.device}" if cuda else ""
        )
        speed = f"{seconds:.1f}s, {images / max(seconds, 1e-9):.0f} img/s{memory}; loss "
        self.display.end_epoch(epoch, self.epochs, seconds, speed + " ".join(losses))

    def evaluate(self, epoch: int) -> None:
        """Measure every active run after the 0-based ``epoch``; its lines say ``epoch + 1`` (epochs completed)."""
        mine = [run for run in self.active_runs() if run.name in self.own]  # runs_parallel: its owner measures it
        results = self.evaluation.measure_runs(mine, self.data)
        if self.dist.splits_runs:
            for part in self.dist.all_gather_object(results):
                results.update(part)
        self.evaluation.record(self.active_runs(), results, epoch + 1, self.records, self.display)

    # -- records -----------------------------------------------------------------------------------

    def check_same_data(self, saved: Any) -> None:
        """On resume: the data found now must be the data the run started with (meta.json's fingerprint)."""
        check_same_seed_data(saved, self.data_fingerprint, self.run_dir)

    def _write_meta(self) -> None:
        cuda = self.device.type == "cuda"
        self.records.write_meta(
            {
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if cuda else platform.processor(),
                "seed": self.seed,
                "seeds": all_seeds(self.experiment),
                "num_classes": self.num_classes,
                "class_counts": list(self.context.class_counts or ()),
                "fused_groups": self.fused_step.describe() if self.fused_step else [],
                "smoke": self.smoke,
                "distributed": self.dist.describe(),
                "metrics_format": METRICS_FORMAT,
                "data_fingerprint": self.data_fingerprint,
            }
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint taken after ``state['epoch']`` epochs."""

        def as_in(run: RunState, epoch: int) -> None:  # the components of the last finished epoch
            sampler = self.lanes.sampler(run, effective_specs(run.config, epoch).sampler)
            run.configure(epoch, self.epochs, self.lanes.iters(sampler), transition=False)

        self.start_epoch = self.records.restore(state, self.runs, as_in)
        self.display.log(f"resumed after epoch {self.start_epoch} of {self.epochs}")

    def finish(self) -> Results:
        self._write_meta()
        short = f"a smoke run of {len(smoke_epochs(self.experiment))} short epochs, numbers mean nothing"
        after = short if self.smoke else f"{self.epochs} epochs"
        results = self.records.results(self.runs, list(self.context.class_counts or ()), f"results after {after}")
        if self.trackers is not None:
            self.trackers.finish(results.rows, result_files(self.run_dir))
            self.trackers.close()
        return results

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.records.history
