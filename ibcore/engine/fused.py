"""Fused runs: runs of the same architecture that share a batch are trained as one stacked model.

Parameters and BatchNorm buffers of K runs are stacked (``torch.func.stack_module_state``) and
the forward pass is ``vmap``-ed over them, so K small models cost about as many kernel launches
as one. Each run keeps its own loss, mixer draw, learning rate, weight decay and momentum. The
sequential path (``Trainer.train_step``) stays the reference: at the end of every epoch the stacked
state is written back into each run's model and ``torch.optim.SGD`` state, so checkpoints,
evaluation and resume are shared with it.

Fusion applies to runs whose optimizer is ``torch.optim.SGD`` (no dampening, not maximising),
that mix only inputs (not hidden layers) and that are not re-training a frozen backbone; other
runs train sequentially and the log says why.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from ibcore.engine.runs import RunState, spec_key

if TYPE_CHECKING:
    from ibcore.engine.trainer import Trainer


def fusion_blocker(run: RunState) -> str | None:
    """Why ``run`` cannot be fused (None when it can)."""
    assert run.specs is not None
    optimizer = run.optimizer
    if type(optimizer) is not torch.optim.SGD:
        return f"optimizer {run.specs.optimizer.name!r} is not plain SGD"
    for group in optimizer.param_groups:
        if group.get("dampening", 0) != 0 or group.get("maximize", False):
            return "SGD with dampening or maximize"
    if run.specs.retrain_classifier:
        return "classifier re-training freezes part of the model"
    if run.mixer is not None and getattr(run.mixer, "mixes_hidden", False):
        return "the mixer mixes hidden activations"
    return None


class _Group:
    """K runs stacked: parameters, buffers, momentum buffers and per-run hyperparameters."""

    def __init__(self, runs: list[RunState], compile: bool = False) -> None:
        self.runs = runs
        self.verified = False  # set once a stacked step has succeeded
        models = [run.model for run in runs]
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.params = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
        self.buffers = {name: b.detach().clone() for name, b in buffers.items()}
        # A skeleton module on the meta device: functional_call only needs its structure.
        self.skeleton = copy.deepcopy(models[0]).to("meta").train()  # fused runs never freeze BatchNorm
        self.names = list(self.params)
        self.groups = []  # per parameter name: the torch param group of each run
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
            self.groups.append(groups_k)
            self.momentum_buffers[name] = torch.stack(buffers_k)
        device = self.params[self.names[0]].device
        shape = lambda t, n: t.view(-1, *([1] * (n - 1)))  # noqa: E731 - broadcast (K,) over a parameter
        self.weight_decay = {
            n: shape(torch.tensor([g["weight_decay"] for g in gs], device=device), self.params[n].dim())
            for n, gs in zip(self.names, self.groups, strict=False)
        }
        self.momentum = {
            n: shape(torch.tensor([g["momentum"] for g in gs], device=device), self.params[n].dim())
            for n, gs in zip(self.names, self.groups, strict=False)
        }
        self.nesterov_mask: dict[str, torch.Tensor | None] = {}
        for n, gs in zip(self.names, self.groups, strict=True):
            flags = [bool(g["nesterov"]) for g in gs]
            mask = shape(torch.tensor(flags, device=device), self.params[n].dim())
            self.nesterov_mask[n] = mask if any(flags) else None
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

    @torch.no_grad()
    def sgd_step(self) -> None:
        """torch.optim.SGD's update (dampening 0), with each run's lr, weight decay and momentum."""
        device = self.params[self.names[0]].device
        # Learning rates change every step: copy them from pinned memory without waiting (no host sync).
        host = torch.tensor([[g["lr"] for g in gs] for gs in self.groups], pin_memory=device.type == "cuda")
        lrs = host.to(device, non_blocking=True)
        for j, name in enumerate(self.names):
            p = self.params[name]
            if p.grad is None:
                continue
            lr = lrs[j].view(-1, *([1] * (p.dim() - 1)))
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


class FusedTrainer:
    """Re-groups fusable runs at every epoch start and steps each group as one stacked model."""

    def __init__(self, trainer: Trainer, forced: bool) -> None:
        self.trainer = trainer
        self.forced = forced
        self.groups: list[_Group] = []
        self.history: list[list[str]] = []  # every distinct group of run names fused so far
        self.unfusable: set[str] = set()  # backbone specs whose stacked step failed on this device
        self._logged: set[str] = set()

    @classmethod
    def plan(cls, trainer: Trainer) -> FusedTrainer | None:
        mode = trainer.experiment.trainer.fused
        if mode == "off":
            trainer.display.log("fused path: off (trainer.fused: off); runs train one after another")
            return None
        if mode == "auto" and trainer.device.type != "cuda":
            # Measured on 2 CPU cores (benchmarks/throughput.py): vmap's grouped convolutions and decomposed
            # BatchNorm are slower there than the runs one after another. Kernel launches, which fusion
            # saves, only dominate on a GPU.
            trainer.display.log("fused path: off on the CPU (trainer.fused: auto); set fused: on to force it")
            return None
        return cls(trainer, forced=mode == "on")

    def __bool__(self) -> bool:
        return True

    def describe(self) -> list[list[str]]:
        return self.history

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            self.trainer.display.log(message)

    def sync_from_runs(self, runs: list[RunState]) -> None:
        """Stack the runs that can share a step this epoch: same backbone spec and same sampler."""
        self.groups = []
        candidates: dict[tuple[str, str], list[RunState]] = defaultdict(list)
        for run in runs:
            assert run.specs is not None
            blocker = fusion_blocker(run)
            if blocker is not None:
                self._log_once(f"fused path: run {run.name!r} trains on its own ({blocker})")
                continue
            if spec_key(run.config.backbone) in self.unfusable:
                continue
            candidates[(spec_key(run.config.backbone), spec_key(run.specs.sampler))].append(run)
        for members in candidates.values():
            if len(members) < 2:
                continue
            self.groups.append(_Group(members, compile=self.trainer.experiment.trainer.compile))
            names = [run.name for run in members]
            if names not in self.history:
                self.history.append(names)
        if self.groups:
            self._log_once(
                "fused path: "
                + "; ".join(f"{len(g.runs)} runs stacked ({', '.join(r.name for r in g.runs)})" for g in self.groups)
            )
        elif self.forced:
            self._log_once("fused path: trainer.fused is 'on' but no two runs share an architecture and a sampler")

    def sync_to_runs(self) -> None:
        for group in self.groups:
            group.write_back()
        self.groups = []

    def step(
        self,
        members: list[RunState],
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        step: int,
        iters: int,
        generators: dict[str, torch.Generator],
    ) -> set[str]:
        """Train every fused group whose runs are in ``members``; return the names it handled."""
        handled: set[str] = set()
        names = {run.name for run in members}
        for group in list(self.groups):
            if not all(run.name in names for run in group.runs):
                continue
            if group.verified:
                self._step_group(group, x, y, epoch, step, iters, generators)
            else:
                # The first step of a group is a trial: some batching rules fail on some devices (on an
                # H100, BatchNorm's backward under vmap and bf16 autocast without cuDNN). Nothing of the
                # runs' own state has changed yet, so they can go on one after another.
                try:
                    self._step_group(group, x, y, epoch, step, iters, generators)
                except RuntimeError as exc:
                    self.groups.remove(group)
                    self.unfusable.add(spec_key(group.runs[0].config.backbone))
                    self.history = [h for h in self.history if h != [r.name for r in group.runs]]
                    reason = str(exc).strip().splitlines()[0][:160]
                    self._log_once(
                        f"fused path: runs {', '.join(r.name for r in group.runs)} train one after another: "
                        f"the stacked step failed on this device ({type(exc).__name__}: {reason})"
                    )
                    continue
                group.verified = True
            handled.update(run.name for run in group.runs)
        return handled

    def _step_group(
        self,
        group: _Group,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
        step: int,
        iters: int,
        generators: dict[str, torch.Generator],
    ) -> None:
        trainer = self.trainer
        plans: list[Any] = []
        for run in group.runs:
            run.set_lr(epoch, step, iters)
            mixer = run.mixer if run.mixer is not None and run.mixer.active(epoch) else None
            if mixer is None:
                plans.append(None)
                continue
            plan = mixer.plan(x, y, generators[run.name])
            plan.permutation = plan.permutation.to(x.device)
            plan.target_weight = plan.target_weight.to(device=x.device, dtype=torch.float32)
            plans.append((mixer, plan))
        shared = all(p is None for p in plans)
        with torch.autocast(device_type=trainer.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
            if shared:
                logits = group.forward(x, shared=True)
            else:
                inputs = torch.stack([x if p is None else p[0].mix(x, p[1]) for p in plans])
                logits = group.forward(inputs, shared=False)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        total = logits.new_zeros(())
        losses = []
        for k, run in enumerate(group.runs):
            if plans[k] is None:
                loss = run.loss(logits[k], y)
            else:
                plan = plans[k][1]
                loss = run.loss(logits[k], y, plan.target_weight) + run.loss(
                    logits[k], y[plan.permutation], 1.0 - plan.target_weight
                )
            losses.append(loss)
            total = total + loss
        total.backward()
        group.sgd_step()
        for run, loss in zip(group.runs, losses, strict=True):
            run.record_loss(loss, step)
