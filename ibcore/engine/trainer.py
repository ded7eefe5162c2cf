"""The trainer: every run of an experiment trained together, over shared batches where samplers agree.

Randomness is a pure function of (seed, epoch, names): samplers, augmentation and mixers get
generators derived from them, and the global torch RNG is re-seeded at every epoch. Checkpoints are
taken at epoch boundaries, so a resumed experiment reaches the same numbers as an uninterrupted one.
Under ``torchrun`` the same loop runs in every process; :mod:`ibcore.engine.distributed` says how the
work is split (one slice of every batch per rank, or one group of runs per rank).
"""

from __future__ import annotations

import functools
import gc
import inspect
import itertools
import json
import math
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from ibcore import __version__
from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.context import BuildContext
from ibcore.engine import checkpoint as ckpt
from ibcore.engine.batches import DeviceData, LoaderData, augment_batch
from ibcore.engine.distributed import (
    Distributed,
    check_resume_world,
    convert_batchnorm,
    dump_indices,
    eval_counts,
    eval_indices,
    rank_indices,
)
from ibcore.engine.experiment_data import check_same_data, fingerprint, load_data
from ibcore.engine.fused import FusedTrainer, full_precision
from ibcore.engine.mixing import draw_plan, mixed_loss
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.repeats import all_seeds, expand_runs
from ibcore.engine.runs import DEFAULT_SAMPLER, RunState, effective_specs, spec_key
from ibcore.engine.seeding import derive_seed
from ibcore.errors import BuildError, ConfigError, ConfigIssue, ContextError, DataError, TrainingError
from ibcore.files import append_text, finite_json
from ibcore.report import METRICS_FORMAT, PLOTS_HINT, read_metrics, write_plots, write_tables
from ibcore.report.console import console_table
from ibcore.report.labels import display_label, evaluator_labels, headline_key, labels_to_keys
from ibcore.report.plots import matplotlib_available
from ibcore.report.results import Results
from ibcore.report.tables import lower_is_better, metric_columns


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"trainer.device is {name!r} but CUDA is not available on this machine; use 'auto'.")
    return device


class _SilentDisplay(ProgressDisplay):
    """The display of a rank other than 0: nothing on the console and nothing in train.log."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(quiet=True, log_path=log_path)

    def log(self, message: str) -> None:
        pass

    def print(self, renderable: Any) -> None:
        pass


class _ForwardAdapter(nn.Module):
    """Routes both forward kinds (plain, and mixed at a hidden layer) through one ``forward``, so DDP sees both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        if layer == 0:
            return self.model(x)  # type: ignore[no-any-return]
        return self.model.forward_mixed(x, layer, mix)  # type: ignore[operator,no-any-return]


class Trainer:
    """Trains the runs of one experiment: in one process (the plain, sequential reference path), or in
    one of several processes launched by ``torchrun`` (``distributed``)."""

    def __init__(
        self,
        experiment: Experiment,
        run_dir: Path,
        *,
        quiet: bool = False,
        distributed: Distributed | None = None,
        smoke: int | None = None,
    ) -> None:
        self.experiment = experiment
        self.smoke = smoke  # a smoke run: this many batches in each epoch of smoke_epochs(), one evaluation
        self.run_dir = run_dir
        self.quiet = quiet
        self.experiment_source = _config_source(run_dir)
        # The seed of what the runs share (torch's global stream, re-seeded every epoch): the first seed.
        self.seed = experiment.seeds[0] if experiment.seeds else experiment.seed
        self.epochs = experiment.trainer.epochs
        self.dist = distributed or Distributed(mode=experiment.trainer.distributed.mode)
        self.device = (
            self.dist.device if self.dist.enabled and self.dist.device else resolve_device(experiment.trainer.device)
        )
        log_path = run_dir / "train.log"
        self.display = (
            ProgressDisplay(quiet=quiet, log_path=log_path) if self.dist.is_main else _SilentDisplay(log_path)
        )
        self.bf16 = experiment.trainer.precision == "bf16" and self.device.type == "cuda"
        if experiment.trainer.precision == "bf16" and not self.bf16:
            self.display.log(
                f"[yellow]trainer.precision is bf16, but bf16 autocast is used only on CUDA: on {self.device.type} "
                "training and evaluation run in fp32[/yellow]"
            )
        self.batch_size = experiment.data.batch_size  # the global batch
        self.local_batch = self.dist.local_batch(self.batch_size)  # this rank's share under data_parallel

        base = BuildContext(
            epochs=self.epochs, device=str(self.device), seed=self.seed, batch_size=experiment.data.batch_size
        )
        self.repeats = expand_runs(experiment)
        self.data = load_data(experiment, all_seeds(experiment), self.device, base)
        first = next(iter(self.data.values()))
        self.context = first.context  # what every seed's data has in common: num_classes, class counts
        self.num_classes = first.num_classes
        where = "on the device, augmented there" if isinstance(first.train, DeviceData) else "via a DataLoader"
        builds = len({id(data) for data in self.data.values()})
        per_seed = f" (a subset drawn per seed: {builds} draws)" if builds > 1 else ""
        self.display.log(
            f"data: {len(first.train)} training images {where}{per_seed}; {self.num_classes} classes; "
            f"class counts {first.class_counts}"
        )
        self.runs = [
            RunState(repeat, self.data[repeat.seed].context.replace(seed=repeat.seed), self.device)
            for repeat in self.repeats
        ]
        self._preflight()
        evaluators = self._evaluators(self.runs[0])
        self.labels = evaluator_labels(evaluators)  # metric key -> the column header of the tables
        self.headline = headline_key(evaluators)  # selects the best epoch on validation; sums up the log
        if experiment.trainer.channels_last:
            # Faster convolutions on GPUs (tensor cores) and CPUs (oneDNN): 1.4-1.7x for small_cnn on 2 cores.
            for run in self.runs:
                run.model.to(memory_format=torch.channels_last)
        if experiment.trainer.compile:
            for run in self.runs:
                run.model.compile()  # in place: state_dict keys, checkpoints and hooks stay as they are
        self.samplers: dict[tuple[int, str], Any] = {}  # (seed, sampler spec) -> sampler
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.start_epoch = 0
        # The runs this process trains: all of them, except under runs_parallel (runs[rank::world]).
        owned = self.runs[self.dist.rank :: self.dist.world_size] if self.dist.splits_runs else self.runs
        self.own = {run.name for run in owned}
        self._ddp: dict[str, tuple[Any, nn.Module]] = {}  # run name -> (its parameters' identity, DDP wrapper)
        if self.dist.enabled:
            self._prepare_ranks()
        if self.dist.splits_batches:
            self.fused = None
            self.display.log(
                "fused path: off under data_parallel (DDP synchronises the gradients of each run's own model, "
                "not those of a stacked copy); runs train one after another"
            )
        else:
            self.fused = FusedTrainer.plan(self)

    def _preflight(self) -> None:
        """Build every component a run will use, at every stage, before the first batch.

        Some mistakes are only visible with the data at hand (a class-weight list of the wrong length,
        ``disable_last_epochs`` longer than the run): they are reported now, with their config path,
        instead of after hours of training.
        """
        context = self.context.replace(iters_per_epoch=1)
        specs: list[tuple[str, str, Any]] = [
            (f"evaluators[{i}]", "evaluator", e) for i, e in enumerate(self.experiment.evaluators)
        ]
        for i, run in enumerate(self.experiment.runs):
            for field in ("loss", "sampler", "mixer", "optimizer"):
                specs.append((f"runs[{i}].{field}", field, getattr(run, field)))
            for j, stage in enumerate(run.stages):
                for field in ("loss", "sampler", "mixer", "optimizer"):
                    specs.append((f"runs[{i}].stages[{j}].{field}", field, getattr(stage, field)))
            for j, adjustment in enumerate(run.posthoc):
                specs.append((f"runs[{i}].posthoc[{j}]", "adjustment", adjustment))
        for i, run in enumerate(self.experiment.runs):
            if run.sampler is None:  # the default sampler can leave no full batch too
                specs.append((f"runs[{i}].sampler (default)", "sampler", DEFAULT_SAMPLER))
        issues = []
        for path, kind, spec in specs:
            if spec is None:
                continue
            try:
                built = build(kind, spec.name, spec.params, context=context)
            except ConfigError as exc:
                issues += [ConfigIssue(f"{path}.{issue.path}", issue.message) for issue in exc.issues]
                continue
            except (ContextError, DataError, BuildError) as exc:
                issues.append(ConfigIssue(path, str(exc)))
                continue
            if kind == "sampler" and self.iters_per_epoch(built) == 0:
                issues.append(ConfigIssue("data.batch_size", self._no_step_message(path, spec.name, len(built))))
        issues += self._input_shape_issues()
        if issues:
            raise ConfigError(issues, source=self.experiment_source)

    def _no_step_message(self, where: str, sampler: str, indices: int) -> str:
        data = self.experiment.data
        return (
            f"{data.batch_size} is more than the {indices} images sampler {sampler!r} ({where}) draws per epoch, "
            "and data.drop_last drops the incomplete batch: that run would take no optimisation step. Lower "
            "data.batch_size or set data.drop_last: false"
        )

    def _input_shape_issues(self) -> list[ConfigIssue]:
        """One forward pass of one training image through each distinct backbone, before the first batch: RGB
        images into a one-channel network, or an image size a model cannot take, are reported at the
        backbone's config path instead of as a traceback from deep inside torch."""
        issues = []
        seen: set[str] = set()
        for i, run in enumerate(self.experiment.runs):
            assert run.backbone is not None
            key = spec_key(run.backbone)
            if key in seen:
                continue
            seen.add(key)
            state = next(r for r in self.runs if r.method == run.name)
            x = _one_image(self.data[state.seed].train).to(self.device)
            was_training = state.model.training
            state.model.eval()  # no BatchNorm statistics change
            try:
                with torch.no_grad():
                    state.model(x)
            except (RuntimeError, ValueError, TypeError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].backbone",
                        f"backbone {run.backbone.name!r} cannot take the images of dataset "
                        f"{self.experiment.data.dataset.name!r} (one image is {tuple(x.shape[1:])}, channels first): "
                        f"{reason}. Check the backbone's params (in_channels, image size)",
                    )
                )
            finally:
                state.model.train(was_training)
        return issues

    def _prepare_ranks(self) -> None:
        """SyncBatchNorm where asked; identical initial weights on every rank (checked, then rank 0's copied)."""
        dist_ = self.dist
        self.display.log(
            f"distributed: {dist_.world_size} processes, {dist_.mode}, backend {dist_.backend}, device {self.device}"
            + (f"; global batch {self.batch_size} = {self.local_batch} per process" if dist_.splits_batches else "")
        )
        if dist_.sync_batchnorm:
            if dist_.splits_batches:
                for run in self.runs:
                    run.model = convert_batchnorm(run.model, self.device)
                self.display.log("BatchNorm statistics computed over the global batch (sync_batchnorm)")
            else:
                self.display.log("trainer.distributed.sync_batchnorm has no effect under runs_parallel")
        if dist_.splits_runs:
            for rank in range(dist_.world_size):
                names = [run.name for run in self.runs[rank :: dist_.world_size]]
                self.display.log(
                    f"rank {rank} trains: {', '.join(names) if names else 'nothing (more ranks than runs)'}"
                )
        differing = [run.name for run in self.runs if dist_.broadcast_module(run.model)]
        if differing:
            self.display.log(
                f"[yellow]initial weights of {', '.join(differing)} differed between ranks (a backbone that draws "
                "from an unseeded source); every rank now uses rank 0's[/yellow]"
            )

    # -- samplers and batching ------------------------------------------------------------------

    def sampler(self, run: RunState, spec: Any) -> Any:
        """The sampler built from ``spec`` for ``run``'s seed (one per distinct seed and spec, shared by the
        runs that name it)."""
        key = (run.seed, spec_key(spec))
        if key not in self.samplers:
            self.samplers[key] = build("sampler", spec.name, spec.params, context=run.context)
        return self.samplers[key]

    def iters_per_epoch(self, sampler: Any) -> int:
        n, batch = len(sampler), self.experiment.data.batch_size
        return n // batch if self.experiment.data.drop_last else math.ceil(n / batch)

    def _configure_runs(self, epoch: int, transition: bool) -> set[str]:
        """Build every active run's components for ``epoch``; return the names of the runs that changed."""
        changed = set()
        for run in self.active_runs():
            # The sampler decides the epoch length, which per-iteration schedules need.
            sampler = self.sampler(run, effective_specs(run.config, epoch).sampler)
            if run.configure(epoch, self.epochs, self.iters_per_epoch(sampler), transition):
                changed.add(run.name)
        return changed

    def active_runs(self) -> list[RunState]:
        return [run for run in self.runs if run.failed is None]

    def own_active_runs(self) -> list[RunState]:
        """The active runs this process trains (all of them but under runs_parallel)."""
        return [run for run in self.runs if run.failed is None and run.name in self.own]

    # -- data parallel -----------------------------------------------------------------------------

    def _prepare_ddp(self, changed: set[str]) -> None:
        """A DDP wrapper per active run, rebuilt when its trainable parameters change (classifier re-training)."""
        from torch.nn.parallel import DistributedDataParallel

        for name in [name for name in self._ddp if name not in {run.name for run in self.active_runs()}]:
            del self._ddp[name]
        rebuilt = False
        for run in self.active_runs():
            if run.name in changed:
                # A starting stage may have re-initialised a part of the model from this rank's RNG.
                self.dist.broadcast_module(run.model)
            key = tuple((id(p), p.requires_grad) for p in run.model.parameters())
            current = self._ddp.get(run.name)
            if current is not None and current[0] == key:
                continue
            if current is not None:
                del self._ddp[run.name]
                del current
                rebuilt = True
            wrapper = DistributedDataParallel(
                _ForwardAdapter(run.model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_buffer_sync_per_forward(),
            )
            self._ddp[run.name] = (key, wrapper)
        if rebuilt:
            gc.collect()  # release the old reducers' hooks before the next backward

    def _forward(self, run: RunState, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        """The run's logits; through its DDP wrapper under data_parallel, so the gradients are averaged."""
        wrapped = self._ddp.get(run.name)
        if wrapped is not None:
            return wrapped[1](x, layer, mix)  # type: ignore[no-any-return]
        if layer == 0:
            return run.model(x)  # type: ignore[no-any-return]
        return run.model.forward_mixed(x, layer, mix)  # type: ignore[operator,no-any-return]

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
            return run.loss(full_precision(self._forward(run, x)), y)
        plan = draw_plan(mixer, x, y, generator)
        if plan.layer == 0:
            logits = self._forward(run, mixer.mix(x, plan))
        else:
            logits = self._forward(run, x, plan.layer, lambda h: mixer.mix(h, plan))
        return mixed_loss(run.loss, full_precision(logits), y, plan)

    # -- epochs ----------------------------------------------------------------------------------

    def lane_of(self, run: RunState) -> tuple[str, int]:
        """The runs whose batches come in lockstep: the same sampler spec, epochs equally long (any seed)."""
        assert run.specs is not None
        key = spec_key(run.specs.sampler)
        return key, self.iters_per_epoch(self.samplers[(run.seed, key)])

    def train_epoch(self, epoch: int) -> None:
        # Runs of one seed and one sampler draw the same batches. Such groups whose epochs are equally long
        # (the same sampler at other seeds) step in lockstep, so the fused path can stack the runs of every seed.
        groups: dict[tuple[int, str], list[RunState]] = defaultdict(list)
        for run in self.own_active_runs():
            assert run.specs is not None
            groups[(run.seed, spec_key(run.specs.sampler))].append(run)
        lanes: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        for (seed, key), members in groups.items():
            lanes[self.lane_of(members[0])].append((seed, key))
        drop_last = self.experiment.data.drop_last
        self.display.start_epoch(epoch, self.epochs, sum(iters for _, iters in lanes))
        # Under data_parallel each rank draws its own dropout masks (and DataLoader augmentation).
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist.splits_batches else (0, 1)
        per_rank = ("rank", rank) if world > 1 else ()
        torch.manual_seed(derive_seed(self.seed, "epoch", epoch, *per_rank))
        for run in self.own_active_runs():
            run.train_mode()  # evaluation left the models in eval mode
        for (key, iters), lane in lanes.items():
            members = [run for group in lane for run in groups[group]]
            streams = [self._batches(epoch, seed, key, (rank, world), drop_last) for seed, key in lane]
            mixer_generators = {run.name: run.mixer_generator(epoch) for run in members}
            for step, lane_batches in enumerate(itertools.islice(zip(*streams, strict=True), self.smoke)):
                batch_of = {
                    run.name: batch for group, batch in zip(lane, lane_batches, strict=True) for run in groups[group]
                }
                handled = (
                    self.fused.step(members, batch_of, epoch, step, iters, mixer_generators) if self.fused else set()
                )
                for run in members:
                    if run.name not in handled:
                        x, y = batch_of[run.name]
                        self._train_step_checked(run, x, y, epoch, step, iters, mixer_generators[run.name])
                self.display.advance(sum(len(batch[1]) for batch in lane_batches) * world)

    def _batches(
        self, epoch: int, seed: int, key: str, shard: tuple[int, int], drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of ``epoch`` for the runs of ``seed`` whose sampler spec is ``key``."""
        rank, world = shard
        order = self.samplers[(seed, key)].indices(epoch)
        if world > 1:
            order = rank_indices(order, rank, world, self.batch_size, drop_last)
        dump_indices(self.dist.rank, epoch, key, order)
        data = self.data[seed].train
        on_device = isinstance(data, DeviceData)
        generator = torch.Generator(device=self.device if on_device else "cpu")
        # Device augmentation draws for the whole global batch on every rank (same seed); see augment_batch.
        per_rank = ("rank", rank) if world > 1 and not on_device else ()
        generator.manual_seed(derive_seed(seed, "augment", key, epoch, *per_rank))
        for x, y in data.iterate(order, self.local_batch, generator, True, drop_last, shard):
            if self.experiment.trainer.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _train_step_checked(
        self,
        run: RunState,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        step: int,
        iters: int,
        generator: torch.Generator,
    ) -> None:
        try:
            self.train_step(run, x, y, epoch, step, iters, generator)
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            raise TrainingError(
                f"run {run.name!r}, epoch {epoch + 1}, batch {step + 1}: a batch of {len(y)} sample cannot "
                "go through BatchNorm in training; set data.drop_last: true (or change "
                "data.batch_size) so the last batch is not a single sample"
            ) from exc

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
        trainer_cfg = self.experiment.trainer
        self._write_meta()
        epochs = range(self.start_epoch, self.epochs)
        if self.smoke is not None:
            epochs = [epoch for epoch in smoke_epochs(self.experiment) if epoch >= self.start_epoch]  # type: ignore[assignment]
            shown = ", ".join(str(epoch + 1) for epoch in epochs)
            self.display.log(
                f"[yellow]smoke run: epochs {shown} of {self.epochs} (the first, each stage's first, the last), "
                f"{self.smoke} batches each, one evaluation on {self.smoke} batches; its numbers mean nothing[/yellow]"
            )
        for epoch in epochs:
            started = time.perf_counter()
            changed = self._configure_runs(epoch, transition=True)
            if self.dist.splits_batches:
                self._prepare_ddp(changed)
            if self.fused:
                self.fused.sync_from_runs(self.own_active_runs(), epoch)
            self.train_epoch(epoch)
            if self.fused:
                self.fused.sync_to_runs()
            if self.dist.splits_batches:
                for run in self.active_runs():
                    # BatchNorm running statistics were updated with each rank's own slice: keep rank 0's.
                    self.dist.broadcast_module(run.model, buffers_only=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the epoch's kernels are queued, not finished
            seconds = time.perf_counter() - started
            self._end_epoch(epoch, seconds)
            last = epoch + 1 == self.epochs
            scheduled = self.smoke is None
            if last or scheduled and (epoch + 1) % trainer_cfg.eval_every == 0:
                self.evaluate(epoch)
            if last or scheduled and (epoch + 1) % trainer_cfg.checkpoint_every == 0:
                self.save(epoch + 1)
            if not self.active_runs():
                self.display.log("every run has failed; stopping")
                break
        self.display.stop()
        self._ddp.clear()
        return self.finish()

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        local = {}
        for run in self.own_active_runs():
            mean, bad = run.end_epoch()
            lr = run.optimizer.param_groups[0]["lr"] if run.optimizer else None
            local[run.name] = (mean, bad, lr)
        # Every rank learns every run's epoch: the mean over ranks of the losses (equal slices under
        # data_parallel), the first non-finite step on any rank, and the slowest rank's time.
        gathered = self.dist.all_gather_object((local, seconds))
        seconds = max(part[1] for part in gathered)
        losses = []
        for run in self.active_runs():
            parts = [part[0][run.name] for part in gathered if run.name in part[0]]
            mean = sum(p[0] for p in parts) / len(parts)
            bads = [p[1] for p in parts if p[1] >= 0]
            bad = min(bads) if bads else -1
            line = {
                "split": "train",
                "run": run.name,
                "epoch": epoch + 1,  # epochs completed: every epoch number a user reads counts them
                "train_loss": mean,
                "lr": parts[0][2],
                "seconds": seconds,
            }
            if bad >= 0:  # the epoch and the batch as ordinals: the 1st epoch, its 4th batch
                run.failed = f"non-finite loss at epoch {epoch + 1}, batch {bad + 1}"
                line["failed"] = run.failed
                self.display.log(f"[red]run {run.name!r} stopped: {escape(run.failed)}[/red]; the other runs go on")
            self._append_metrics(line)
            losses.append(f"{run.name}={mean:.4f}")
        images = sum(len(self.samplers[k]) for k in {(r.seed, spec_key(r.specs.sampler)) for r in self.runs if r.specs})
        self.display.end_epoch(
            epoch,
            self.epochs,
            seconds,
            f"{seconds:.1f}s, {images / max(seconds, 1e-9):.0f} img/s; loss " + " ".join(losses),
        )

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate_split(self, run: RunState, data: DeviceData | LoaderData) -> dict[str, dict[str, Any]]:
        """Metrics of ``run`` on ``data``: raw, and with each post-hoc adjustment of the run.

        Under data_parallel each rank computes the logits of its own contiguous block of ``data``;
        the blocks are gathered in order, so every rank's evaluators see the whole split once, in the
        same batches as a single process.
        """
        variants: dict[str, tuple[Any, list[Any]]] = {run.name: (None, self._evaluators(run))}
        for spec in run.config.posthoc:
            adjustment = build("adjustment", spec.name, spec.params, context=run.context)
            variants[run.repeat.variant(spec.name)] = (adjustment, self._evaluators(run))
        model = run.model
        model.eval()
        eval_batch = self.experiment.data.eval_batch_size or 2 * self.batch_size
        if not self.dist.splits_batches:
            order = np.arange(len(data) if self.smoke is None else min(len(data), self.smoke * eval_batch))
            for outputs, y in self._variant_logits(model, variants, data, order, eval_batch):
                for name, (_, evaluators) in variants.items():
                    for evaluator in evaluators:
                        evaluator.update(outputs[name], y)
        else:
            world = self.dist.world_size
            counts = eval_counts(len(data), world)
            order = eval_indices(len(data), self.dist.rank, world)
            collected: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
            labels: list[torch.Tensor] = []
            for outputs, y in self._variant_logits(model, variants, data, order, math.ceil(eval_batch / world)):
                for name in variants:
                    collected[name].append(outputs[name])
                labels.append(y.to(torch.long))
            empty_labels = torch.empty(0, dtype=torch.long, device=self.device)
            targets = self.dist.all_gather_rows(torch.cat(labels) if labels else empty_labels, counts)
            for name, (_, evaluators) in variants.items():
                empty = torch.empty(0, self.num_classes, device=self.device)
                logits = self.dist.all_gather_rows(torch.cat(collected[name]) if collected[name] else empty, counts)
                for start in range(0, len(targets), eval_batch):
                    for evaluator in evaluators:
                        evaluator.update(logits[start : start + eval_batch], targets[start : start + eval_batch])
        results = {}
        for name, (_, evaluators) in variants.items():
            merged: dict[str, Any] = {}
            for evaluator in evaluators:
                merged.update(evaluator.compute())
            results[name] = merged
        return results

    def _variant_logits(
        self,
        model: nn.Module,
        variants: dict[str, tuple[Any, list[Any]]],
        data: DeviceData | LoaderData,
        order: np.ndarray,
        batch_size: int,
    ) -> Any:
        """Per batch of ``order``: the logits of every variant (raw or post-hoc adjusted) and the targets."""
        for x, y in data.iterate(order, batch_size, None, False, False):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                features = model.features(x)  # type: ignore[operator]
                logits = model.classifier(features)  # type: ignore[operator]
            features, logits = features.float(), logits.float()
            outputs = {
                name: logits if adjustment is None else adjustment(model, features, logits)
                for name, (adjustment, _) in variants.items()
            }
            yield outputs, y

    def _evaluators(self, run: RunState) -> list[Any]:
        return [build("evaluator", e.name, e.params, context=run.context) for e in self.experiment.evaluators]

    def evaluate(self, epoch: int) -> None:
        """Measure every active run after the 0-based ``epoch``; its lines say ``epoch + 1`` (epochs completed)."""
        completed = epoch + 1
        results: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}  # run -> (split, variant, metrics)
        for run in self.active_runs():
            if run.name not in self.own:
                continue  # runs_parallel: its owner evaluates it
            data = self.data[run.seed]
            entries = [("test", variant, m) for variant, m in self._evaluate_split(run, data.test).items()]
            if data.val is not None:
                entries += [("val", variant, m) for variant, m in self._evaluate_split(run, data.val).items()]
            results[run.name] = entries
        if self.dist.splits_runs:
            for part in self.dist.all_gather_object(results):
                results.update(part)
        for run in self.active_runs():
            for split, variant, metrics in results[run.name]:
                self._append_metrics({"split": split, "run": variant, "epoch": completed, **metrics})
                score = self._headline(metrics)[1] if split == "val" else None
                if score is not None and score > self.best.get(variant, {}).get("score", -math.inf):
                    test = self._last_metrics("test", variant, completed)
                    self.best[variant] = {"score": score, "epoch": completed, "test": test}
        summary: list[str] = []
        keys: set[str] = set()
        for run in self.active_runs():
            key, headline = self._headline(self._last_metrics("test", run.name, completed))
            if key is not None and headline is not None:
                summary.append(f"{run.name}={headline:.2f}")
                keys.add(key)
        if summary:
            what = display_label(keys.pop(), self.labels) if len(keys) == 1 else "headline metric"
            self.display.log(f"epoch {completed}: test {escape(what)} " + " ".join(summary))

    def _headline(self, metrics: dict[str, Any]) -> tuple[str | None, float | None]:
        """The headline metric of an evaluation: the first evaluator's that declares one (``acc1`` for accuracy,
        ``balanced_acc`` for balanced_accuracy), else the first scalar metric where higher is better."""
        candidates = [self.headline] if self.headline else []
        candidates += [key for key in metrics if not lower_is_better(key)]
        for key in candidates:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return key, float(value)
        return None, None

    # -- files -----------------------------------------------------------------------------------

    def _append_metrics(self, line: dict[str, Any]) -> None:
        line = finite_json(line)  # strict JSON everywhere: a NaN metric is null, with the reason kept
        self.history.append(line)  # on every rank: all of them keep the same history
        if not self.dist.is_main:
            return
        append_text(self.run_dir / "metrics.jsonl", json.dumps(line, default=_json_default) + "\n")

    def _last_metrics(self, split: str, run: str, epoch: int) -> dict[str, Any]:
        for line in reversed(self.history):
            if line.get("split") == split and line.get("run") == run and line.get("epoch") == epoch:
                return {k: v for k, v in line.items() if k not in ("split", "run", "epoch")}
        return {}

    @functools.cached_property
    def data_fingerprint(self) -> dict[str, Any]:
        """Per seed, a cheap fingerprint of the data (counts, label hashes, sampled image bytes), kept in meta.json."""
        return {str(seed): fingerprint(data) for seed, data in self.data.items()}

    def check_same_data(self, saved: Any) -> None:
        """On resume: the data found now must be the data the run started with (meta.json's fingerprint)."""
        if isinstance(saved, dict):  # a run of an older ibcore recorded none
            for seed, now in self.data_fingerprint.items():
                check_same_data(saved.get(seed), now, self.run_dir)

    def _write_meta(self) -> None:
        if not self.dist.is_main:
            return
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
            "seeds": all_seeds(self.experiment),
            "num_classes": self.num_classes,
            "class_counts": list(self.context.class_counts or ()),
            "fused_groups": self.fused.describe() if self.fused else [],
            "smoke": self.smoke,
            "distributed": self.dist.describe(),
            "metrics_format": METRICS_FORMAT,
            "data_fingerprint": self.data_fingerprint,
        }
        ckpt.atomic_write_text(self.run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    def save(self, epoch: int) -> None:
        """Rank 0 writes one checkpoint holding every run (under runs_parallel, gathered from their owners)."""
        if self.dist.splits_runs:
            self._gather_run_states()
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
                for run in self.runs
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
            ckpt.save_checkpoint(directory, epoch, _plain(state), self.experiment.trainer.keep_checkpoints)
        except OSError as exc:  # disk full, quota, permissions
            raise TrainingError(
                f"cannot write the checkpoint {directory / f'epoch-{epoch:04d}.pt'}: {exc.strerror or exc}; "
                "the previous checkpoint is intact, free space and run `ib resume` on the run directory"
            ) from exc

    def _gather_run_states(self) -> None:
        """runs_parallel: copy every run's model and optimizer state from its owner into rank 0's copy."""
        mine = {
            run.name: {
                "model": _to_cpu(run.model.state_dict()),
                "optimizer": _to_cpu(run.optimizer.state_dict()) if run.optimizer is not None else {},
            }
            for run in self.runs
            if run.name in self.own
        }
        parts = self.dist.gather_object(mine)
        if parts is None:
            return
        by_name = {run.name: run for run in self.runs}
        for part in parts[1:]:  # rank 0's own runs are in place already
            for name, saved in part.items():
                run = by_name[name]
                run.model.load_state_dict(saved["model"])
                if run.optimizer is not None and saved["optimizer"]:
                    run.optimizer.load_state_dict(saved["optimizer"])

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint taken after ``state['epoch']`` epochs; training continues from there.

        Under torchrun every rank loads the same checkpoint, which must come from as many processes
        in the same mode; each rank gets its own RNG state back.
        """
        path = ckpt.loaded_from(state)
        ckpt.check_structure(state, path, complete=True)
        check_resume_world(state, self.dist, self.run_dir)
        epoch = int(state["epoch"])
        names = {run.name for run in self.runs}
        if set(state["runs"]) != names:
            raise TrainingError(f"the checkpoint holds runs {sorted(state['runs'])}, the config {sorted(names)}")
        for run in self.runs:
            saved = state["runs"][run.name]
            run.failed = saved["failed"]
            # Components as they were in the last finished epoch; the next epoch performs any stage start.
            sampler = self.sampler(run, effective_specs(run.config, epoch - 1).sampler)
            run.configure(epoch - 1, self.epochs, self.iters_per_epoch(sampler), transition=False)
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
        self.start_epoch = epoch
        if self.dist.is_main:
            # metrics.jsonl may hold lines written after this checkpoint: rewrite it from the history.
            text = "".join(json.dumps(line, default=_json_default) + "\n" for line in self.history)
            ckpt.atomic_write_text(self.run_dir / "metrics.jsonl", text)
        self.display.log(f"resumed after epoch {epoch} of {self.epochs}")

    def finish(self) -> Results:
        self._write_meta()
        rows, best_rows = [], []
        for run in self.runs:
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
        write_plots(
            self.run_dir, read_metrics(self.run_dir / "metrics.jsonl"), rows, list(self.context.class_counts or ())
        )
        if not matplotlib_available():
            self.display.log(f"[yellow]{escape(PLOTS_HINT)}[/yellow]")
        after = (
            f"a smoke run of {len(smoke_epochs(self.experiment))} short epochs, numbers mean nothing"
            if self.smoke
            else f"{self.epochs} epochs"
        )
        self.display.print(console_table(rows, title=f"results after {after} ({self.run_dir})", labels=self.labels))
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


def _one_image(data: DeviceData | LoaderData) -> torch.Tensor:
    """The first training image as a batch of one, normalised as the evaluation sees it."""
    if isinstance(data, DeviceData):
        return augment_batch(data.images[:1], data.augment, None, False)
    image, _ = data.split[0]
    return torch.as_tensor(image).unsqueeze(0).to(torch.get_default_dtype())


def smoke_epochs(experiment: Experiment) -> list[int]:
    """The epochs a smoke run trains: the first, the first of every stage, and the last. Schedules, stages and
    samplers see their true epoch numbers, so every phase of every run is exercised."""
    starts = {stage.from_epoch for run in experiment.runs for stage in run.stages}
    return sorted({0, experiment.trainer.epochs - 1} | {e for e in starts if e < experiment.trainer.epochs})


@functools.cache
def _no_buffer_sync_per_forward() -> dict[str, Any]:
    """DDP's switch for not broadcasting buffers before every forward (renamed in newer PyTorch).

    BatchNorm running statistics are copied from rank 0 at the end of every epoch instead.
    """
    from torch.nn.parallel import DistributedDataParallel

    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def _to_cpu(value: Any) -> Any:
    """A state dict with every tensor on the CPU (to send it to another rank)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _config_source(run_dir: Path) -> str:
    """The config file a run came from (for error messages), else the run's own config.yaml."""
    try:
        origin = json.loads((run_dir / "origin.json").read_text(encoding="utf-8"))
        if (
            isinstance(origin, dict)
            and isinstance(origin.get("config"), str)
            and origin["config"].endswith((".yaml", ".yml", ".json"))
        ):
            return origin["config"]
    except (OSError, ValueError):
        pass
    return str(run_dir / "config.yaml")


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
