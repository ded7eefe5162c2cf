"""The optimizer updates of K stacked runs: torch.optim.SGD's and Adam/AdamW's arithmetic on (K, ...) tensors.

A fused group (:mod:`ibcore.engine.steps.fused`) keeps each trainable parameter of its K runs as one stacked
tensor; the update of all K runs is then one set of kernels per parameter, with each run's own learning rate,
weight decay, momentum or betas broadcast over the run axis. Every hyper-parameter is a device tensor and
nothing is read back to the host, so the update can be captured in a CUDA graph with the rest of the step.

The torch optimizers stay the reference: :meth:`StackedOptimizer.reload` reads their state and
:meth:`StackedOptimizer.write_back` hands it back (checkpoints, evaluation and resume are theirs), and the
equivalence tests compare both paths in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

#: The optimizer classes whose update is written here; a run with another optimizer trains on its own.
SGD_FAMILY = "sgd"
ADAM_FAMILY = "adam"


def optimizer_family(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """The stacked update that computes ``optimizer``'s, or None and why not."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        for group in optimizer.param_groups:
            if group.get("dampening", 0) != 0 or group.get("maximize", False):
                return None, "SGD with dampening or maximize"
        return SGD_FAMILY, ""
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        for group in optimizer.param_groups:
            if group.get("amsgrad", False) or group.get("maximize", False):
                return None, f"{kind.__name__} with amsgrad or maximize"
        return ADAM_FAMILY, ""
    return None, f"optimizer {kind.__name__} has no stacked update (SGD, Adam and AdamW have)"


class RunOptimizer(Protocol):
    """What the stacked update needs of a run: its torch optimizer and its model's named parameters."""

    optimizer: torch.optim.Optimizer
    model: torch.nn.Module


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps Adam's step count as a float tensor of this dtype (torch.optim.optimizer._get_scalar_dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class StackedOptimizer:
    """Shared bookkeeping: for each stacked parameter name, each run's torch parameter and param group."""

    #: per-run state tensors kept stacked, by torch's state key
    state_keys: tuple[str, ...] = ()

    def __init__(self, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> None:
        self.names = list(params)
        self.params = params
        named = [dict(run.model.named_parameters()) for run in runs]
        group_of = [{id(p): g for g in run.optimizer.param_groups for p in g["params"]} for run in runs]
        # param_groups[j][k]: run k's torch param group of parameter names[j] (learning rates are read from it)
        self.param_groups: list[list[dict[str, Any]]] = [
            [group_of[k][id(named[k][name])] for k in range(len(runs))] for name in self.names
        ]
        self.device = params[self.names[0]].device if self.names else torch.device("cpu")
        self.state: dict[str, dict[str, Tensor]] = {
            name: {key: self._fresh(key, params[name]) for key in self.state_keys} for name in self.names
        }
        self.reload(runs)

    def _fresh(self, key: str, param: Tensor) -> Tensor:
        return torch.zeros_like(param)

    def per_run(self, name: str, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """A hyper-parameter of each run's group of ``name``, shaped to broadcast over the parameter: (K, 1, ...)."""
        return self.broadcast(name, [group[key] for group in self.param_groups[self.names.index(name)]], dtype)

    def broadcast(self, name: str, values: list[Any], dtype: torch.dtype | None = None) -> Tensor:
        """One value per run as a device tensor shaped to broadcast over parameter ``name``: (K, 1, ...)."""
        tensor = torch.tensor(values, device=self.device, dtype=dtype or self.params[name].dtype)
        return tensor.view(-1, *([1] * (self.params[name].dim() - 1)))

    @torch.no_grad()
    def reload(self, runs: Sequence[RunOptimizer]) -> None:
        """Copy each run's torch optimizer state into the stacked state, in place (a captured graph reads it)."""
        for k, run in enumerate(runs):
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                saved = run.optimizer.state.get(parameters[name], {})
                for key, stacked in self.state[name].items():
                    self._load(stacked, k, saved.get(key))

    def _load(self, stacked: Tensor, k: int, saved: Tensor | None) -> None:
        if saved is None:
            stacked[k].zero_()
        else:
            stacked[k].copy_(saved)

    @torch.no_grad()
    def write_back(self, runs: Sequence[RunOptimizer]) -> None:
        """Hand the stacked state to each run's torch optimizer (the reference object that checkpoints save)."""
        for k, run in enumerate(runs):
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                state = run.optimizer.state[parameters[name]]
                for key, stacked in self.state[name].items():
                    state[key] = self._saved(stacked, k)

    def _saved(self, stacked: Tensor, k: int) -> Tensor:
        return stacked[k].clone()

    def step(self, lrs: Tensor) -> None:
        """One update of every stacked parameter that has a gradient; ``lrs[j, k]`` is run k's learning rate of
        parameter ``names[j]``."""
        raise NotImplementedError


class StackedSGD(StackedOptimizer):
    """torch.optim.SGD (no dampening, not maximising): L2 weight decay, (Nesterov) momentum."""

    state_keys = ("momentum_buffer",)

    def __init__(self, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> None:
        super().__init__(runs, params)
        self.weight_decay = {n: self.per_run(n, "weight_decay") for n in self.names}
        self.momentum = {n: self.per_run(n, "momentum") for n in self.names}
        self.nesterov: dict[str, Tensor | None] = {}
        for name in self.names:
            mask = self.per_run(name, "nesterov", dtype=torch.bool)
            self.nesterov[name] = mask if bool(mask.any()) else None

    @torch.no_grad()
    def step(self, lrs: Tensor) -> None:
        for j, name in enumerate(self.names):
            p = self.params[name]
            if p.grad is None:
                continue
            lr = lrs[j].view(-1, *([1] * (p.dim() - 1)))
            d_p = p.grad + self.weight_decay[name] * p
            buf = self.state[name]["momentum_buffer"]
            buf.mul_(self.momentum[name]).add_(d_p)
            mask = self.nesterov[name]
            update = buf if mask is None else torch.where(mask, d_p + self.momentum[name] * buf, buf)
            p.sub_(lr * update)
            p.grad = None


class StackedAdam(StackedOptimizer):
    """torch.optim.Adam and AdamW (no amsgrad, not maximising), in one group: L2 weight decay for Adam runs,
    decoupled weight decay for AdamW runs, each run's betas and eps; torch's bias corrections from each run's
    own step count."""

    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> None:
        super().__init__(runs, params)
        self.beta1, self.beta2, self.eps, self.l2, self.decoupled = {}, {}, {}, {}, {}
        for j, name in enumerate(self.names):
            groups = self.param_groups[j]
            decoupled = [bool(g.get("decoupled_weight_decay", False)) for g in groups]
            decay = [g["weight_decay"] for g in groups]
            self.beta1[name] = self.broadcast(name, [g["betas"][0] for g in groups])
            self.beta2[name] = self.broadcast(name, [g["betas"][1] for g in groups])
            self.eps[name] = self.broadcast(name, [g["eps"] for g in groups])
            self.l2[name] = self.broadcast(name, [0.0 if d else w for w, d in zip(decay, decoupled, strict=True)])
            self.decoupled[name] = self.broadcast(
                name, [w if d else 0.0 for w, d in zip(decay, decoupled, strict=True)]
            )

    def _fresh(self, key: str, param: Tensor) -> Tensor:
        if key == "step":  # one count per run, kept on the device so a graph can advance it
            return torch.zeros(param.shape[0], device=param.device, dtype=param.dtype)
        return torch.zeros_like(param)

    def _saved(self, stacked: Tensor, k: int) -> Tensor:
        if stacked.dim() == 1:  # the step count: a host scalar tensor, as torch.optim keeps it
            return torch.tensor(float(stacked[k]), dtype=_scalar_dtype())
        return stacked[k].clone()

    @torch.no_grad()
    def step(self, lrs: Tensor) -> None:
        for j, name in enumerate(self.names):
            p = self.params[name]
            if p.grad is None:
                continue
            state = self.state[name]
            shape = (-1, *([1] * (p.dim() - 1)))
            lr = lrs[j].view(shape)
            state["step"].add_(1)
            step = state["step"].view(shape)
            p.mul_(1 - lr * self.decoupled[name])  # AdamW runs; 1 exactly for Adam runs
            grad = p.grad + self.l2[name] * p  # Adam runs; + 0 for AdamW runs
            beta1, beta2 = self.beta1[name], self.beta2[name]
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).add_(grad * grad * (1 - beta2))
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step).sqrt()
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(self.eps[name])
            p.sub_(lr / bias_correction1 * state["exp_avg"] / denom)
            p.grad = None


def stacked_optimizer(family: str, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> StackedOptimizer:
    """The stacked update of ``family`` (see :func:`optimizer_family`) over ``params`` (the trainable ones)."""
    return StackedSGD(runs, params) if family == SGD_FAMILY else StackedAdam(runs, params)
