"""Fused runs: runs of the same architecture that share a batch are trained as one stacked model.

Parameters and BatchNorm buffers of K runs are stacked (``torch.func.stack_module_state``) and
the forward pass is ``vmap``-ed over them, so K small models cost about as many kernel launches
as one. Each run keeps its own loss, mixer draw, learning rate and optimizer hyper-parameters. The
standard step (:mod:`ibcore.engine.steps.standard`) stays the reference: at the end of every epoch the
stacked state is written back into each run's model and torch optimizer, so checkpoints, evaluation
and resume are shared with it. Only runs whose step is ``standard`` (``fusable``) come here.

What is stacked: runs whose optimizer has a stacked update (``torch.optim.SGD`` without dampening,
``Adam`` and ``AdamW`` without amsgrad; :mod:`ibcore.engine.steps.stacked_optim`), that mix only inputs (not
hidden layers), grouped by architecture, sampler lane, optimizer family and which parameters train: a cRT or
LWS stage's runs stack with each other, their frozen backbone stacked without gradients and in the runs' own
train/eval modes. Other runs train sequentially and the log says why.

On CUDA (``trainer.cuda_graphs: auto``) each group's whole step (forward, losses, backward, update)
is captured once in a CUDA graph and replayed for every full batch, since a small model's step is
bound by kernel launches; a run with no partner gets a group of its own for that. Mixing runs replay
too: their plans are drawn on the host from each run's seeded stream, exactly as the sequential step
draws them, and copied into the graph's inputs as tensors (:class:`~ibcore.engine.mixing.PlanTensors`),
which the captured step mixes with :func:`~ibcore.engine.mixing.standard_mix`. Groups are kept
from epoch to epoch while their runs' objects are unchanged, so a graph is captured again only
when a stage changes a run. BatchNorm inside the stacked model is one call over the K runs'
channels (:mod:`ibcore.engine.stacked_norm`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from rich.markup import escape
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from ibcore.config.schema import TrainerConfig
from ibcore.engine.memory import StepMemory, describe, free_device_memory, measure_step
from ibcore.engine.mixing import PlanTensors, full_precision, loss_of, plan_tensors, standard_mix
from ibcore.engine.stacked_norm import stack_batchnorm
from ibcore.engine.steps.stacked_optim import optimizer_family, stacked_optimizer
from ibcore.engine.views import RunView
from ibcore.errors import TrainingError
from ibcore.protocols import Batch, MixPlan


def fusable(step: object) -> bool:
    """Whether ``step`` declares itself the standard step's arithmetic (``fusable = True``), so its runs may be
    stacked. The declaration counts only where the step's ``__call__`` is defined: a subclass of the standard
    step that overrides ``__call__`` computes something else, whatever it inherits."""
    owner = next((k for k in type(step).__mro__ if "__call__" in vars(k)), None)
    return owner is not None and bool(vars(owner).get("fusable", False))


def fusion_blocker(run: RunView) -> str | None:
    """Why ``run`` cannot be fused (None when it can)."""
    family, reason = optimizer_family(run.optimizer)
    return reason if family is None else None


def structure_of(run: RunView) -> tuple[Any, ...]:
    """What runs stacked in one group must share besides the architecture: the optimizer's update, which
    parameters train (cRT trains the classifier only, LWS a per-class scale it adds) and which modules are in
    training mode (a frozen backbone keeps its BatchNorm statistics)."""
    family, _ = optimizer_family(run.optimizer)
    parameters = tuple((name, p.requires_grad) for name, p in run.model.named_parameters())
    return family, parameters, tuple(module.training for module in run.model.modules())


class _Group:
    """K runs stacked: parameters, buffers, the optimizer state and per-run hyperparameters."""

    def __init__(self, runs: list[RunView], compile: bool = False) -> None:
        self.runs = runs
        self.depends_on = _depends_on(runs)
        self.mixing = [run.mixing for run in runs]
        self.verified = False  # set once a stacked step has succeeded
        self.sized = False  # set once the group is known to fit in the device's memory (FusedStep._sized)
        models = [run.model for run in runs]
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        trains = {name: p.requires_grad for name, p in models[0].named_parameters()}
        # Frozen parameters (a cRT or LWS stage's backbone) are stacked too, for the forward pass, without grads.
        self.params = {name: p.detach().clone().requires_grad_(trains[name]) for name, p in params.items()}
        self.buffers = {name: b.detach().clone() for name, b in buffers.items()}
        # A skeleton module on the meta device: functional_call only needs its structure. It keeps the runs'
        # training flags: a frozen backbone's BatchNorm uses its running statistics, as in the runs' own models.
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        stack_batchnorm(self.skeleton)  # one BatchNorm call over K·C channels instead of vmap's decomposition
        family, _ = optimizer_family(runs[0].optimizer)
        assert family is not None, "regroup stacks only runs with a stacked update"
        trainable = {name: p for name, p in self.params.items() if p.requires_grad}
        self.optimizer = stacked_optimizer(family, runs, trainable)  # type: ignore[arg-type]
        self.params.update(self.optimizer.params)  # the trainable parameters now live in the optimizer's buffer
        device = self.params[next(iter(self.params))].device
        # Learning rates (parameter, run) live in a device tensor that each step refills without a host sync,
        # so a CUDA graph of the step reads the current values.
        self.lrs = torch.zeros(len(self.optimizer.names), len(runs), device=device)
        self.graph: GraphRunner | None = None
        self.capture_failed = False  # capture failed once: this group steps kernel by kernel
        self.eager_only = False  # set each epoch: a run of the group cannot replay a graph (see FusedStep.regroup)
        self.warm = False  # one eager step on a side stream has run (required before a capture)
        self._call = vmap(self._forward, in_dims=(0, 0, None), randomness="different")
        self._call_each = vmap(self._forward, in_dims=(0, 0, 0), randomness="different")
        if compile:
            self._call = torch.compile(self._call)
            self._call_each = torch.compile(self._call_each)

    def _forward(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(self.skeleton, (params, buffers), (x,))

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Logits (K, N, C): ``x`` is one batch for all runs (``shared``) or (K, N, ...) per run."""
        return (self._call if shared else self._call_each)(self.params, self.buffers, x)

    def load_lrs(self) -> None:
        """Copy the runs' current learning rates into ``self.lrs`` (from pinned memory, without waiting)."""
        cuda = self.lrs.device.type == "cuda"
        host = torch.tensor([[g["lr"] for g in gs] for gs in self.optimizer.param_groups], pin_memory=cuda)
        self.lrs.copy_(host.view(self.lrs.shape), non_blocking=cuda)

    def update(self) -> None:
        """Each run's optimizer update (its learning rate, weight decay, momentum or betas)."""
        self.optimizer.step(self.lrs)

    @torch.no_grad()
    def reload(self) -> None:
        """Copy each run's model and optimizer state into the stacked tensors, in place (a captured graph reads
        them)."""
        for k, run in enumerate(self.runs):
            parameters = dict(run.model.named_parameters())
            for name, stacked in self.params.items():
                stacked[k].copy_(parameters[name])
            buffers = dict(run.model.named_buffers())
            for name, value in self.buffers.items():
                value[k].copy_(buffers[name])
        self.optimizer.reload(self.runs)  # type: ignore[arg-type]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked state into each run's model and optimizer (the reference objects)."""
        for k, run in enumerate(self.runs):
            parameters = dict(run.model.named_parameters())
            for name, stacked in self.params.items():
                parameters[name].copy_(stacked[k])
            buffers = dict(run.model.named_buffers())
            for name, value in self.buffers.items():
                buffers[name].copy_(value[k])
        self.optimizer.write_back(self.runs)  # type: ignore[arg-type]


class FusedStep:
    """The fused implementation of the training step: re-groups fusable runs at every epoch start
    (:meth:`regroup`) and steps each group as one stacked model; :meth:`write_back` hands the state back.

    ``graph_runner`` captures and replays a step (:class:`CapturedStep` on CUDA); ``graphs`` turns that on.
    """

    def __init__(
        self,
        *,
        log: Callable[[str], None],
        device_type: str,
        bf16: bool = False,
        graphs: bool = False,
        compile: bool = False,
        forced: bool = False,
        graph_runner: Callable[..., GraphRunner] | None = None,
        max_runs: int | None = None,
    ) -> None:
        self.log = log
        self.device_type = device_type
        self.bf16 = bf16
        self.graphs = graphs
        self.compile = compile
        self.forced = forced
        self.graph_runner = graph_runner or CapturedStep
        self.max_runs = max_runs  # trainer.fused_max_runs: None sizes groups by the device's free memory
        self.memory_budget: Callable[[torch.device], int | None] = free_device_memory  # bytes; a test sets its own
        # One flat update over all parameters launches ~80x fewer kernels, which pays on a GPU; on a CPU the
        # per-parameter update is faster (no full-size temporaries: benchmarks/stacked_update.py). Tests set it.
        self.flat_updates = device_type == "cuda"
        self._step_memory: dict[tuple[Any, ...], StepMemory] = {}  # measured once per architecture and input
        self._limits: dict[tuple[Any, ...], int] = {}  # the most runs one group may stack, per _size_key
        self.groups: list[_Group] = []
        self.kept: list[_Group] = []  # last epoch's groups, reused when their runs are unchanged
        self.fused_sets: list[list[str]] = []  # every distinct set of run names fused so far (meta.json)
        self.unfusable: set[str] = set()  # backbone specs whose stacked step failed on this device
        self.ungraphable: set[str] = set()  # runs whose step could not be captured in a CUDA graph
        self.hidden_mixers: set[str] = set()  # runs whose mixer drew a hidden layer: they train on their own
        self.graph_replays = 0  # steps replayed from a CUDA graph (what the log and tests check)
        self.groups_built = 0  # stacked groups built (a group is reused while its runs do not change)
        self._logged: set[str] = set()

    @classmethod
    def plan(
        cls,
        settings: TrainerConfig,
        device: torch.device,
        log: Callable[[str], None],
        *,
        bf16: bool,
        data_parallel: bool,
        graph_runner: Callable[..., GraphRunner] | None = None,
    ) -> FusedStep | None:
        """The fused step the trainer settings ask for on ``device``, or None (the log says why)."""
        cuda = device.type == "cuda"
        if data_parallel:
            log(
                "fused path: off under data_parallel (DDP synchronises the gradients of each run's own model, "
                "not those of a stacked copy); runs train one after another"
            )
            return None
        if settings.fused == "off":
            log('fused path: off (trainer.fused: "off"); runs train one after another')
            return None
        if settings.fused == "auto" and not cuda:
            # Measured on 2 CPU cores (benchmarks/throughput.py): vmap's grouped convolutions and decomposed
            # BatchNorm are slower there than the runs one after another; kernel launches dominate only on a GPU.
            log('fused path: off on the CPU (trainer.fused: auto); set trainer.fused: "on" to force it')
            return None
        # torch.compile has its own graphs (mode="reduce-overhead"); the two are not combined.
        graphs = settings.cuda_graphs == "auto" and (cuda or graph_runner is not None) and not settings.compile
        if settings.cuda_graphs == "auto" and cuda and settings.compile:
            log("CUDA graphs: off while trainer.compile is on (torch.compile brings its own)")
        return cls(
            log=log, device_type=device.type, bf16=bf16, graphs=graphs, compile=settings.compile,
            forced=settings.fused == "on", graph_runner=graph_runner, max_runs=settings.fused_max_runs,
        )  # fmt: skip

    def describe(self) -> list[list[str]]:
        return self.fused_sets

    def log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            self.log(message)

    def regroup(self, views: Sequence[RunView], standard: set[str]) -> None:
        """Stack the runs that can share a step this epoch: same backbone spec and same sampler lane. Only runs
        named in ``standard`` (whose step is the standard step) are candidates; the others train on their own.

        With CUDA graphs, a run that has no partner still gets a group of its own (K = 1) when it mixes
        nothing this epoch: its whole step is then replayed from a graph instead of launched kernel by kernel.
        """
        self.groups = []
        candidates: dict[tuple[Any, ...], list[RunView]] = defaultdict(list)
        for view in views:
            if view.name not in standard:
                step = view.specs.step.name
                self.log_once(f"fused path: run {view.name!r} trains on its own (its step {step!r} is not 'standard')")
        runs = [view for view in views if view.name in standard]
        for run in runs:
            blocker = fusion_blocker(run)
            if blocker is not None:
                self.log_once(f"fused path: run {run.name!r} trains on its own ({blocker})")
                continue
            if run.backbone_key in self.unfusable or run.name in self.hidden_mixers:
                continue
            # With graphs, runs that cannot replay one (a mixer whose mix is its own; a loss that does not
            # declare itself a pure function of its tensors) are stacked apart: the others keep theirs.
            eager_only = self.graphs and not (_graph_safe_loss(run) and _graph_safe_mixer(run))
            # Runs of every seed whose batches come in lockstep (the same sampler, equally long epochs) stack.
            candidates[(run.backbone_key, run.lane, eager_only, structure_of(run))].append(run)
        for (_, _, eager_only, _), candidates_k in candidates.items():
            if len(candidates_k) == 1 and (not self.graphs or eager_only or candidates_k[0].name in self.ungraphable):
                continue
            # A size found to fit in an earlier epoch splits the runs before they are stacked (see _sized).
            limit = self._limits.get(_size_key(candidates_k[0]))
            for members in _even_parts(candidates_k, limit or len(candidates_k)):
                group = self._group_of(members)
                group.eager_only = eager_only
                group.sized = group.sized or limit is not None
                self.groups.append(group)
                names = [run.name for run in members]
                if len(names) > 1 and names not in self.fused_sets:
                    self.fused_sets.append(names)
        stacked = [g for g in self.groups if len(g.runs) > 1]
        if stacked:
            self.log_once(
                "fused path: "
                + "; ".join(f"{len(g.runs)} runs stacked ({', '.join(r.name for r in g.runs)})" for g in stacked)
            )
        elif self.forced:
            self.log_once(
                "fused path: trainer.fused is 'on' but no two runs share an architecture, a sampler, an optimizer "
                "family (SGD; Adam/AdamW) and the same trainable parameters (a cRT stage trains the classifier, "
                "an LWS stage a scale)"
            )
        graphed = [r.name for g in self.groups if not g.eager_only for r in g.runs]
        if self.graphs:
            for run in runs:
                if fusion_blocker(run) is None and not _graph_safe_loss(run):
                    self.log_once(
                        f"CUDA graphs: run {run.name!r} steps kernel by kernel: its loss does not declare "
                        "cuda_graph_safe = True (a pure function of its tensors; see docs/registering.md)"
                    )
                elif fusion_blocker(run) is None and not _graph_safe_mixer(run):
                    self.log_once(
                        f"CUDA graphs: run {run.name!r} steps kernel by kernel: its mixer does not declare "
                        "standard_mix = True (see docs/registering.md)"
                    )
        if self.graphs and graphed:
            self.log_once(
                "CUDA graphs: the training step of " + ", ".join(graphed) + " is captured in a graph and replayed "
                "for every full batch (captured again when a stage changes a run)"
            )

    def _group_of(self, members: list[RunView]) -> _Group:
        """Last epoch's group of these runs if nothing it depends on changed (it keeps its CUDA graph), else
        a new one."""
        now = _depends_on(members)
        for group in self.kept:
            # The group holds the objects themselves, so none can have been freed and its id reused.
            same = len(group.depends_on) == len(now) and all(
                a is b for old, new in zip(group.depends_on, now, strict=True) for a, b in zip(old, new, strict=True)
            )
            if same:
                group.runs = members  # this epoch's views (their mixer streams and flags)
                group.reload()
                return group
        self.groups_built += 1
        return _Group(members, compile=self.compile)

    def write_back(self) -> None:
        """Copy every group's stacked state into its runs' models and optimizers (at the end of an epoch)."""
        for group in self.groups:
            group.write_back()
        self.kept, self.groups = self.groups, []

    def __call__(self, runs: Sequence[RunView], batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        """Train every group whose runs are all in ``runs``, each run on ``batches[name]``; return the losses of
        the runs it trained (the others are left to their own step)."""
        losses: dict[str, Tensor] = {}
        names = {run.name for run in runs}
        for whole in list(self.groups):
            if not all(run.name in names for run in whole.runs):
                continue
            for group in self._sized(whole, batches):
                self._step_or_give_back(group, batches, losses)
        return losses

    def _step_or_give_back(self, group: _Group, batches: Mapping[str, Batch], losses: dict[str, Tensor]) -> None:
        """Step ``group``, adding its runs' losses to ``losses``; a group whose runs turn out to mix hidden layers
        is given back to the runs (they then train on their own)."""
        x, y = _group_batch(group, batches)
        try:
            stepped = self._try_step(group, x, y)
        except _MixesHidden as exc:
            # Nothing has changed this step: the runs' state so far goes back to them, and from now on the
            # mixing runs train on their own (the group's other runs too, for the rest of this epoch).
            group.write_back()
            self.groups.remove(group)
            self.hidden_mixers.update(exc.runs)
            for name in exc.runs:
                self.log_once(f"fused path: run {name!r} mixes hidden activations: it trains on its own")
            return
        if stepped is not None:
            losses.update(stepped)

    def _sized(self, group: _Group, batches: Mapping[str, Batch]) -> list[_Group]:
        """``group``, or the groups it is split into so that each one's step fits in the device's memory (and in
        ``trainer.fused_max_runs``). Decided once, before a group's first step; an explicit
        ``fused_max_runs`` that the estimate says does not fit is refused, with the number that does."""
        if group.sized:
            return [group]
        group.sized = True
        k = len(group.runs)
        x, _ = _group_batch(group, batches)
        budget = self.memory_budget(x.tensor.device) if k > 1 or self.max_runs is not None else None
        limit = self.max_runs  # None: no cap known
        if budget is not None:
            memory = self._memory_of(group, x)
            batch_size = len(x.of(0))
            fits = memory.most_runs(batch_size, budget)
            need = f"one stacked step of {k} runs ({', '.join(r.name for r in group.runs)})"
            estimate = (
                f"about {describe(memory.group(1, batch_size))} a run at batch size {batch_size}, "
                f"{describe(budget)} free on {x.tensor.device}"
            )
            if self.max_runs is not None and min(self.max_runs, k) > fits:
                raise TrainingError(
                    f"trainer.fused_max_runs: {self.max_runs}: {need} in groups of {min(self.max_runs, k)} needs "
                    f"{estimate}; at most {fits} fit. Set trainer.fused_max_runs: {max(fits, 1)}, or leave it "
                    "unset and the engine splits the runs into groups that fit"
                    + ("" if fits else ", or lower data.batch_size")
                )
            if fits == 0:
                self.log_once(
                    f"[yellow]fused path: even one run's step may not fit ({estimate}): the runs step one by one; "
                    "lower data.batch_size if they run out of memory[/yellow]"
                )
            limit = max(fits, 1) if limit is None else min(limit, max(fits, 1))
            if limit < k:
                self.log_once(f"fused path: {need} would need {describe(memory.group(k, batch_size))} ({estimate})")
        if limit is None:
            return [group]
        self._limits[_size_key(group.runs[0])] = limit  # what fits, for the groups of later epochs
        if limit >= k:
            return [group]
        members = _even_parts(group.runs, limit)
        size = len(members[0])
        split = [self._group_of(runs) for runs in members]
        for part in split:
            part.eager_only, part.sized = group.eager_only, True
        at = self.groups.index(group)
        self.groups[at : at + 1] = split
        names = [run.name for run in group.runs]
        self.fused_sets = [h for h in self.fused_sets if h != names] + [
            [run.name for run in runs] for runs in members if len(runs) > 1
        ]
        self.log_once(f"fused path: {k} runs stacked as {len(split)} groups of at most {size} runs, one after another")
        return split

    def _memory_of(self, group: _Group, x: _Batch) -> StepMemory:
        """One run's share of the group's step, measured once per architecture, structure and input shape."""
        sample = x.of(0)[0]
        key = (*_size_key(group.runs[0]), tuple(sample.shape), sample.dtype)
        run = group.runs[0]
        if key not in self._step_memory:
            slots = len(group.optimizer.state_keys)
            self._step_memory[key] = measure_step(run.model, sample, slots, self._autocast)
        return self._step_memory[key]

    def _try_step(self, group: _Group, x: _Batch, y: _Batch) -> dict[str, Tensor] | None:
        """One step of ``group``; None when its first step failed and its runs go on one after another."""
        if group.verified:
            return self._step_group(group, x, y)
        # The first step of a group is a trial: some batching rules fail on some devices (on an H100,
        # BatchNorm's backward under vmap and bf16 autocast without cuDNN). Nothing of the runs' own state has
        # changed yet, so they can go on one after another.
        try:
            losses = self._step_group(group, x, y)
        except RuntimeError as exc:
            self.groups.remove(group)
            self.unfusable.add(group.runs[0].backbone_key)
            self.fused_sets = [h for h in self.fused_sets if h != [r.name for r in group.runs]]
            reason = str(exc).strip().splitlines()[0][:160]
            self.log_once(
                f"fused path: runs {', '.join(r.name for r in group.runs)} train one after another: "
                f"the stacked step failed on this device ({type(exc).__name__}: {escape(reason)})"
            )
            return None
        group.verified = True
        if self.flat_updates:
            # The trial step showed which parameters get gradients: when all do, they accumulate into one flat
            # buffer from now on and the update is a few kernels over all of it (see stacked_optim).
            group.optimizer.use_flat_gradients()
        return losses

    def _step_group(self, group: _Group, x: _Batch, y: _Batch) -> dict[str, Tensor]:
        """One step of ``group``: ``x``, ``y`` are one batch for every run, or (K, N, ...) with one per run."""
        plans = _draw_plans(group, x, y)
        group.load_lrs()
        mixes = any(p is not None for p in plans)
        losses: Any = None
        if self.graphs and not (group.eager_only or group.capture_failed):
            # The plans travel to the graph as tensors; the eager steps below use them as they are.
            inputs: tuple[Tensor, ...] = (x.tensor, y.tensor)
            if mixes:
                inputs += plan_tensors(plans, len(y.of(0)), x.tensor).as_tuple()
            if group.graph is None or group.graph.fits(inputs):
                losses = self._graph_step(group, x.shared, y.shared, inputs)
        if losses is None:
            losses = self._mixed_step(group, x, y, plans) if mixes else self._plain_step(group, x, y)
        return {run.name: losses[k] for k, run in enumerate(group.runs)}

    def _autocast(self) -> Any:
        # No weight-cast cache: the step must be capturable in a CUDA graph, and vmap re-reads the weights.
        return torch.autocast(
            device_type=self.device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        )

    def _plain_step(self, group: _Group, x: _Batch, y: _Batch) -> torch.Tensor:
        """Forward, each run's loss, backward and SGD update; the (K,) losses."""
        with self._autocast():
            logits = full_precision(group.forward(x.tensor, shared=x.shared))
        losses = torch.stack([run.loss(logits[k], y.of(k)) for k, run in enumerate(group.runs)])
        losses.sum().backward()
        group.update()
        return losses.detach()

    def _mixed_step(self, group: _Group, x: _Batch, y: _Batch, plans: list[MixPlan | None]) -> list[torch.Tensor]:
        """As :meth:`_plain_step`, with each mixing run's own mixed inputs and two-target loss."""
        with self._autocast():
            inputs = []
            for k, (run, plan) in enumerate(zip(group.runs, plans, strict=True)):
                inputs.append(x.of(k) if plan is None or run.mixer is None else run.mixer.mix(x.of(k), plan))
            logits = full_precision(group.forward(torch.stack(inputs), shared=False))
        losses = [loss_of(run.loss, logits[k], y.of(k), plans[k]) for k, run in enumerate(group.runs)]
        torch.stack(losses).sum().backward()
        group.update()
        return [loss.detach() for loss in losses]

    def _planned_step(self, group: _Group, x: _Batch, y: _Batch, plans: PlanTensors) -> torch.Tensor:
        """:meth:`_mixed_step` with the plans as tensors (:func:`standard_mix`): what a CUDA graph replays."""
        with self._autocast():
            inputs = [standard_mix(x.of(k), plans, k) if mixing else x.of(k) for k, mixing in enumerate(group.mixing)]
            logits = full_precision(group.forward(torch.stack(inputs), shared=False))
        losses = torch.stack(
            [
                loss_of(run.loss, logits[k], y.of(k), plans.plan(k) if group.mixing[k] else None)
                for k, run in enumerate(group.runs)
            ]
        )
        losses.sum().backward()
        group.update()
        return losses.detach()

    def _tensor_step(self, group: _Group, x_shared: bool, y_shared: bool, inputs: tuple[Tensor, ...]) -> Tensor:
        """The step on a tuple of tensors (inputs, targets and, when a run mixes, its plans): what is captured."""
        x, y = _Batch(inputs[0], x_shared), _Batch(inputs[1], y_shared)
        if len(inputs) == 2:
            return self._plain_step(group, x, y)
        return self._planned_step(group, x, y, PlanTensors(*inputs[2:]))

    def _graph_step(self, group: _Group, x_shared: bool, y_shared: bool, inputs: tuple[Tensor, ...]) -> torch.Tensor:
        """The step replayed from a CUDA graph: one warm-up step, then a capture, then replays. ``inputs`` are
        copied into the graph's own tensors at each replay: the batch, and the mixing runs' plans."""
        step = lambda *tensors: self._tensor_step(group, x_shared, y_shared, tensors)  # noqa: E731
        if group.graph is None and not group.warm:
            # Capture needs the step to have run once on a side stream (cuDNN autotuning, lazy initialisation).
            with _side_stream(inputs[0].device):
                losses = step(*inputs)
            group.warm = True
            return losses
        if group.graph is None:
            try:
                group.graph = self.graph_runner(step, inputs)
            except RuntimeError as exc:  # e.g. a loss that reads a value back to the host
                group.capture_failed = True
                group.optimizer.clear_gradients()  # capture does not run kernels: nothing else has changed
                if len(group.runs) == 1:
                    self.ungraphable.add(group.runs[0].name)
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                self.log_once(
                    f"CUDA graphs: the step of {', '.join(r.name for r in group.runs)} cannot be captured; "
                    f"it runs kernel by kernel ({type(exc).__name__}: {escape(reason)})"
                )
                return step(*inputs)
        self.graph_replays += 1
        return group.graph.replay(inputs)


def _size_key(run: RunView) -> tuple[Any, ...]:
    """Runs with equal keys need equal memory per run in a stacked step."""
    return (run.backbone_key, structure_of(run))


def _even_parts(runs: list[RunView], limit: int) -> list[list[RunView]]:
    """``runs`` in as few parts of at most ``limit`` as possible, of even sizes (64 runs at most 21 a part: 4 × 16)."""
    parts = math.ceil(len(runs) / limit)
    size = math.ceil(len(runs) / parts)
    return [runs[i : i + size] for i in range(0, len(runs), size)]


def _draw_plans(group: _Group, x: _Batch, y: _Batch) -> list[MixPlan | None]:
    """Each run's mixer plan for this step, or None. A plan that mixes a hidden layer cannot be stacked (the
    stacked forward mixes inputs only): the generators are put back as they were and :class:`_MixesHidden`
    raised, so the standard step draws the very same plans."""
    states = [run.generator.get_state() for run in group.runs]
    plans = [run.mix_plan(x.of(k), y.of(k)) for k, run in enumerate(group.runs)]
    hidden = [run.name for run, plan in zip(group.runs, plans, strict=True) if plan is not None and plan.layer != 0]
    if hidden:
        for run, state in zip(group.runs, states, strict=True):
            run.generator.set_state(state)
        raise _MixesHidden(hidden)
    return plans


@dataclasses.dataclass(frozen=True)
class _Batch:
    """A group's inputs or targets: one tensor for all its runs (``shared``), or (K, N, ...) with one per run
    (runs of several seeds draw their own batches)."""

    tensor: torch.Tensor
    shared: bool

    def of(self, k: int) -> torch.Tensor:
        """Run ``k``'s batch."""
        return self.tensor if self.shared else self.tensor[k]


def _group_batch(group: _Group, batches: Mapping[str, Batch]) -> tuple[_Batch, _Batch]:
    """The inputs and targets of ``group``'s runs: shared when they are one batch, else stacked."""
    mine = [batches[run.name] for run in group.runs]
    if all(batch is mine[0] for batch in mine):
        return _Batch(mine[0].inputs, True), _Batch(mine[0].targets, True)
    inputs = torch.stack([b.inputs for b in mine])
    return _Batch(inputs, False), _Batch(torch.stack([b.targets for b in mine]), False)


class _MixesHidden(Exception):  # noqa: N818 - a control-flow signal, not an error a user sees
    """A run's plan mixes a hidden layer, which the stacked forward cannot do."""

    def __init__(self, runs: list[str]) -> None:
        super().__init__(", ".join(runs))
        self.runs = runs


def _graph_safe_loss(run: RunView) -> bool:
    """Whether the run's loss says it may be replayed from a CUDA graph (``cuda_graph_safe = True``).

    A graph replays the kernels the loss launched when it was captured: Python-side state that changes
    between calls (a step counter, a schedule) would be frozen, and reading a value back to the host fails.
    Only the loss can know, so it opts in; the built-in losses do.
    """
    return bool(getattr(run.loss, "cuda_graph_safe", False))


def _graph_safe_mixer(run: RunView) -> bool:
    """Whether the run's mixing can be replayed from a CUDA graph: it mixes nothing this epoch, or its mixer
    declares ``standard_mix = True`` (the fused step then mixes with :func:`standard_mix`)."""
    return not run.mixing or bool(getattr(run.mixer, "standard_mix", False))


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh CUDA stream that starts after, and ends before, the current stream's work."""
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _depends_on(runs: list[RunView]) -> list[tuple[Any, ...]]:
    """What a stacked step depends on: each run's model, optimizer, loss, mixer and stage objects, and whether
    it mixes this epoch (a captured step mixes the runs it mixed when it was captured). A stage that changes any
    of them builds new objects."""
    return [(r.model, r.optimizer, r.loss, r.mixer, r.specs, r.mixing) for r in runs]


class GraphRunner(Protocol):
    """Captures a step once and replays it for inputs of the same shapes (:class:`CapturedStep` on CUDA; a test
    injects one that runs the step eagerly). Inputs are a tuple of tensors: the batch's inputs and targets, and
    the mixing runs' :class:`~ibcore.engine.mixing.PlanTensors` when any run of the group mixes."""

    def fits(self, inputs: tuple[Tensor, ...]) -> bool: ...

    def replay(self, inputs: tuple[Tensor, ...]) -> Tensor: ...


class CapturedStep:
    """A training step captured in a CUDA graph, with the static inputs it reads."""

    def __init__(self, step: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> None:
        self.inputs = tuple(t.clone(memory_format=torch.preserve_format) for t in inputs)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread may call CUDA meanwhile; only this thread is captured.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.losses: torch.Tensor = step(*self.inputs)

    def fits(self, inputs: tuple[Tensor, ...]) -> bool:
        """Whether inputs can go through the graph (same shapes and layouts: not a last, smaller batch)."""
        return len(inputs) == len(self.inputs) and all(
            a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            for a, b in zip(inputs, self.inputs, strict=True)
        )

    def replay(self, inputs: tuple[Tensor, ...]) -> Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.losses
