"""Fused runs: runs of the same architecture that share a batch are trained as one stacked model.

Parameters and BatchNorm buffers of K runs are stacked (``torch.func.stack_module_state``) and
the forward pass is ``vmap``-ed over them, so K small models cost about as many kernel launches
as one. Each run keeps its own loss, mixer draw, learning rate, weight decay and momentum. The
standard step (:mod:`ibcore.engine.steps.standard`) stays the reference: at the end of every epoch the
stacked state is written back into each run's model and ``torch.optim.SGD`` state, so checkpoints,
evaluation and resume are shared with it. Only runs whose step is ``standard`` (``fusable``) come here.

Fusion applies to runs whose optimizer is ``torch.optim.SGD`` (no dampening, not maximising),
that mix only inputs (not hidden layers) and that are not re-training a frozen backbone; other
runs train sequentially and the log says why.

On CUDA (``trainer.cuda_graphs: auto``) each group's whole step (forward, losses, backward, update)
is captured once in a CUDA graph and replayed for every full batch, since a small model's step is
bound by kernel launches; a run with no partner gets a group of its own for that. Groups are kept
from epoch to epoch while their runs' objects are unchanged, so a graph is captured again only
when a stage changes a run. BatchNorm inside the stacked model is one call over the K runs'
channels (:mod:`ibcore.engine.stacked_norm`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from rich.markup import escape
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from ibcore.config.schema import TrainerConfig
from ibcore.engine.mixing import full_precision, loss_of
from ibcore.engine.stacked_norm import stack_batchnorm
from ibcore.engine.views import RunView
from ibcore.protocols import Batch, MixPlan


def fusable(step: object) -> bool:
    """Whether ``step`` declares itself the standard step's arithmetic (``fusable = True``), so its runs may be
    stacked. The declaration counts only where the step's ``__call__`` is defined: a subclass of the standard
    step that overrides ``__call__`` computes something else, whatever it inherits."""
    owner = next((k for k in type(step).__mro__ if "__call__" in vars(k)), None)
    return owner is not None and bool(vars(owner).get("fusable", False))


def fusion_blocker(run: RunView) -> str | None:
    """Why ``run`` cannot be fused (None when it can)."""
    optimizer = run.optimizer
    if type(optimizer) is not torch.optim.SGD:
        return f"optimizer {run.specs.optimizer.name!r} is not plain SGD"
    for group in optimizer.param_groups:
        if group.get("dampening", 0) != 0 or group.get("maximize", False):
            return "SGD with dampening or maximize"
    if run.specs.backbone_frozen:
        return "classifier re-training (cRT, LWS) freezes part of the model"
    return None


class _Group:
    """K runs stacked: parameters, buffers, momentum buffers and per-run hyperparameters."""

    def __init__(self, runs: list[RunView], compile: bool = False) -> None:
        self.runs = runs
        self.depends_on = _depends_on(runs)
        self.verified = False  # set once a stacked step has succeeded
        models = [run.model for run in runs]
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.params = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
        self.buffers = {name: b.detach().clone() for name, b in buffers.items()}
        # A skeleton module on the meta device: functional_call only needs its structure.
        self.skeleton = copy.deepcopy(models[0]).to("meta").train()  # fused runs never freeze BatchNorm
        stack_batchnorm(self.skeleton)  # one BatchNorm call over K·C channels instead of vmap's decomposition
        self.names = list(self.params)
        self.param_groups: list[list[dict[str, Any]]] = []  # per parameter name: each run's torch param group
        self.momentum_buffers = {}
        # Per run, once: parameters by name and each parameter's optimizer group (not a scan per parameter).
        named = [dict(run.model.named_parameters()) for run in runs]
        group_of = [
            {id(p): g for g in run.optimizer.param_groups for p in g["params"]}  # type: ignore[union-attr]
            for run in runs
        ]
        for name in self.names:
            groups_k = []
            buffers_k = []
            for k, run in enumerate(runs):
                assert run.optimizer is not None
                parameter = named[k][name]
                groups_k.append(group_of[k][id(parameter)])
                state = run.optimizer.state.get(parameter, {})
                buffer = state.get("momentum_buffer")
                buffers_k.append(buffer.detach().clone() if buffer is not None else torch.zeros_like(parameter))
            self.param_groups.append(groups_k)
            self.momentum_buffers[name] = torch.stack(buffers_k)
        device = self.params[self.names[0]].device
        shape = lambda t, n: t.view(-1, *([1] * (n - 1)))  # noqa: E731 - broadcast (K,) over a parameter
        self.weight_decay = {
            n: shape(torch.tensor([g["weight_decay"] for g in gs], device=device), self.params[n].dim())
            for n, gs in zip(self.names, self.param_groups, strict=True)
        }
        self.momentum = {
            n: shape(torch.tensor([g["momentum"] for g in gs], device=device), self.params[n].dim())
            for n, gs in zip(self.names, self.param_groups, strict=True)
        }
        self.nesterov_mask: dict[str, torch.Tensor | None] = {}
        for n, gs in zip(self.names, self.param_groups, strict=True):
            flags = [bool(g["nesterov"]) for g in gs]
            mask = shape(torch.tensor(flags, device=device), self.params[n].dim())
            self.nesterov_mask[n] = mask if any(flags) else None
        # Learning rates (parameter, run) live in a device tensor that each step refills without a host sync,
        # so a CUDA graph of the step reads the current values.
        self.lrs = torch.zeros(len(self.names), len(runs), device=device)
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
        host = torch.tensor([[g["lr"] for g in gs] for gs in self.param_groups], pin_memory=cuda)
        self.lrs.copy_(host, non_blocking=cuda)

    @torch.no_grad()
    def sgd_step(self) -> None:
        """torch.optim.SGD's update (dampening 0), with each run's lr (``self.lrs``), weight decay and momentum."""
        for j, name in enumerate(self.names):
            p = self.params[name]
            if p.grad is None:
                continue
            lr = self.lrs[j].view(-1, *([1] * (p.dim() - 1)))
            d_p = p.grad + self.weight_decay[name] * p
            buf = self.momentum_buffers[name]
            buf.mul_(self.momentum[name]).add_(d_p)
            mask = self.nesterov_mask[name]
            if mask is not None:
                update = torch.where(mask, d_p + self.momentum[name] * buf, buf)
            else:
                update = buf
            p.sub_(lr * update)
            p.grad = None

    @torch.no_grad()
    def reload(self) -> None:
        """Copy each run's model and momentum into the stacked tensors, in place (a captured graph reads them)."""
        for k, run in enumerate(self.runs):
            assert run.optimizer is not None
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                self.params[name][k].copy_(parameters[name])
                buffer = run.optimizer.state.get(parameters[name], {}).get("momentum_buffer")
                if buffer is None:
                    self.momentum_buffers[name][k].zero_()
                else:
                    self.momentum_buffers[name][k].copy_(buffer)
            buffers = dict(run.model.named_buffers())
            for name, value in self.buffers.items():
                value[k].copy_(buffers[name])

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked state into each run's model and optimizer (the reference objects)."""
        for k, run in enumerate(self.runs):
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                parameters[name].copy_(self.params[name][k])
                assert run.optimizer is not None
                state = run.optimizer.state[parameters[name]]
                state["momentum_buffer"] = self.momentum_buffers[name][k].clone()
            buffers = dict(run.model.named_buffers())
            for name, value in self.buffers.items():
                buffers[name].copy_(value[k])


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
    ) -> None:
        self.log = log
        self.device_type = device_type
        self.bf16 = bf16
        self.graphs = graphs
        self.compile = compile
        self.forced = forced
        self.graph_runner = graph_runner or CapturedStep
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
            forced=settings.fused == "on", graph_runner=graph_runner,
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
        candidates: dict[tuple[str, tuple[str, int], bool], list[RunView]] = defaultdict(list)
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
            # With graphs, runs that cannot replay one (a mixer draws a new batch per run and step; a loss that
            # does not declare itself a pure function of its tensors) are stacked apart: the others keep theirs.
            eager_only = self.graphs and (run.mixing or not _graph_safe_loss(run))
            # Runs of every seed whose batches come in lockstep (the same sampler, equally long epochs) stack.
            candidates[(run.backbone_key, run.lane, eager_only)].append(run)
        for (_, _, eager_only), members in candidates.items():
            if len(members) == 1 and (not self.graphs or eager_only or members[0].name in self.ungraphable):
                continue
            group = self._group_of(members)
            group.eager_only = eager_only
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
            self.log_once("fused path: trainer.fused is 'on' but no two runs share an architecture and a sampler")
        graphed = [r.name for g in self.groups if not g.eager_only for r in g.runs]
        if self.graphs:
            for run in runs:
                if fusion_blocker(run) is None and not _graph_safe_loss(run):
                    self.log_once(
                        f"CUDA graphs: run {run.name!r} steps kernel by kernel: its loss does not declare "
                        "cuda_graph_safe = True (a pure function of its tensors; see docs/registering.md)"
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
        for group in list(self.groups):
            if not all(run.name in names for run in group.runs):
                continue
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
                continue
            if stepped is not None:
                losses.update(stepped)
        return losses

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
        return losses

    def _step_group(self, group: _Group, x: _Batch, y: _Batch) -> dict[str, Tensor]:
        """One step of ``group``: ``x``, ``y`` are one batch for every run, or (K, N, ...) with one per run."""
        plans = _draw_plans(group, x, y)
        group.load_lrs()
        losses: Any
        if any(p is not None for p in plans):
            losses = self._mixed_step(group, x, y, plans)
        elif (
            self.graphs
            and not (group.eager_only or group.capture_failed)
            and (group.graph is None or group.graph.fits(x, y))
        ):
            losses = self._graph_step(group, x, y)
        else:
            losses = self._plain_step(group, x, y)
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
        group.sgd_step()
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
        group.sgd_step()
        return [loss.detach() for loss in losses]

    def _graph_step(self, group: _Group, x: _Batch, y: _Batch) -> torch.Tensor:
        """The plain step replayed from a CUDA graph: one warm-up step, then a capture, then replays."""
        if group.graph is None and not group.warm:
            # Capture needs the step to have run once on a side stream (cuDNN autotuning, lazy initialisation).
            with _side_stream(x.tensor.device):
                losses = self._plain_step(group, x, y)
            group.warm = True
            return losses
        if group.graph is None:
            try:
                step = lambda gx, gy: self._plain_step(group, _Batch(gx, x.shared), _Batch(gy, y.shared))  # noqa: E731
                group.graph = self.graph_runner(step, x.tensor, y.tensor)
            except RuntimeError as exc:  # e.g. a loss that reads a value back to the host
                group.capture_failed = True
                for parameter in group.params.values():
                    parameter.grad = None  # capture does not run kernels: nothing else has changed
                if len(group.runs) == 1:
                    self.ungraphable.add(group.runs[0].name)
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                self.log_once(
                    f"CUDA graphs: the step of {', '.join(r.name for r in group.runs)} cannot be captured; "
                    f"it runs kernel by kernel ({type(exc).__name__}: {escape(reason)})"
                )
                return self._plain_step(group, x, y)
        self.graph_replays += 1
        return group.graph.replay(x.tensor, y.tensor)


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
    """What a stacked step depends on: each run's model, optimizer, loss, mixer and stage objects. A stage
    that changes any of them builds new objects."""
    return [(r.model, r.optimizer, r.loss, r.mixer, r.specs) for r in runs]


class GraphRunner(Protocol):
    """Captures a step once and replays it for batches of the same shape (:class:`CapturedStep` on CUDA; a
    test injects one that runs the step eagerly)."""

    def fits(self, x: _Batch, y: _Batch) -> bool: ...

    def replay(self, x: Tensor, y: Tensor) -> Tensor: ...


class CapturedStep:
    """A training step captured in a CUDA graph, with the static input batch it reads."""

    def __init__(self, step: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x.clone(memory_format=torch.preserve_format)
        self.y = y.clone()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread may call CUDA meanwhile; only this thread is captured.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.losses: torch.Tensor = step(self.x, self.y)

    def fits(self, x: _Batch, y: _Batch) -> bool:
        """Whether a batch can go through the graph (same shape and layout: not a last, smaller batch)."""
        return (
            x.tensor.shape == self.x.shape and x.tensor.stride() == self.x.stride() and y.tensor.shape == self.y.shape
        )

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.losses
