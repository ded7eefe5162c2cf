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


class FlatLayout:
    """K runs' stacked trainable parameters (and each optimizer state) as views of one flat buffer: parameter by
    parameter, each (K, *shape) block contiguous. An update is then a few kernels over the whole buffer instead of
    a few per parameter; each run's hyper-parameters reach its elements through :meth:`per_element`."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        first = next(iter(params.values()))
        self.runs = first.shape[0]
        self.shapes = {name: p.shape for name, p in params.items()}
        self.total = sum(p.numel() for p in params.values())
        self.device, self.dtype = first.device, first.dtype
        # one segment per (parameter, run), in the buffer's order: run k's copy of that parameter
        lengths = [p.numel() // self.runs for p in params.values() for _ in range(self.runs)]
        self.segments = torch.tensor(lengths, device=self.device)

    def buffer(self, dtype: torch.dtype | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """A zeroed flat buffer and its (K, *shape) view for each parameter."""
        flat = torch.zeros(self.total, device=self.device, dtype=dtype or self.dtype)
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            views[name] = flat[offset : offset + size].view(shape)
            offset += size
        return flat, views

    def per_element(self, values: Tensor) -> Tensor:
        """``values[j * K + k]`` (parameter j, run k) spread over that run's copy of that parameter: (total,)."""
        return torch.repeat_interleave(values, self.segments, output_size=self.total)


class StackedOptimizer:
    """Shared bookkeeping: for each stacked parameter name, each run's torch parameter and param group; the
    parameters, gradients and state in one :class:`FlatLayout`.

    The stacked parameters handed in are copied into the layout's buffer; :attr:`params` are the leaves the
    stacked model must use from then on. Until :meth:`use_flat_gradients` (after a first step shows that every
    parameter gets a gradient), the update goes parameter by parameter and skips one without a gradient, as
    torch.optim does; then gradients accumulate into one flat buffer and the update runs over all of it.
    """

    #: per-run state tensors kept stacked, by torch's state key
    state_keys: tuple[str, ...] = ()

    def __init__(self, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> None:
        self.names = list(params)
        named = [dict(run.model.named_parameters()) for run in runs]
        group_of = [{id(p): g for g in run.optimizer.param_groups for p in g["params"]} for run in runs]
        # param_groups[j][k]: run k's torch param group of parameter names[j] (learning rates are read from it)
        self.param_groups: list[list[dict[str, Any]]] = [
            [group_of[k][id(named[k][name])] for k in range(len(runs))] for name in self.names
        ]
        self.layout = FlatLayout(params)
        self.device = self.layout.device
        self.flat_param, views = self.layout.buffer()
        with torch.no_grad():
            for name, value in params.items():
                views[name].copy_(value)
        # Leaves that share the flat buffer's memory: what the stacked forward pass differentiates.
        self.params = {name: view.detach().requires_grad_(True) for name, view in views.items()}
        self.flat_grad, self.grads = self.layout.buffer()
        self.flat = False
        self.without_grad: set[str] = set()  # parameters the last step left without a gradient
        self.updated: set[str] = set()  # parameters updated at least once (torch.optim has state for those only)
        self.flat_state: dict[str, Tensor] = {}
        self.state: dict[str, dict[str, Tensor]] = {name: {} for name in self.names}
        for key in self.state_keys:
            self.flat_state[key], key_views = self.layout.buffer()
            for name in self.names:
                self.state[name][key] = key_views[name]
        self.reload(runs)

    def values(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """A hyper-parameter of every (parameter, run) in the layout's order, (J·K,): for ``per_element``."""
        rows = [[group[key] for group in groups] for groups in self.param_groups]
        return torch.tensor(rows, device=self.device, dtype=dtype or self.layout.dtype).view(-1)

    def per_run(self, name: str, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """A hyper-parameter of each run's group of ``name``, shaped to broadcast over the parameter: (K, 1, ...)."""
        return self.broadcast(name, [group[key] for group in self.param_groups[self.names.index(name)]], dtype)

    def broadcast(self, name: str, values: list[Any], dtype: torch.dtype | None = None) -> Tensor:
        """One value per run as a device tensor shaped to broadcast over parameter ``name``: (K, 1, ...)."""
        tensor = torch.tensor(values, device=self.device, dtype=dtype or self.layout.dtype)
        return tensor.view(-1, *([1] * (len(self.layout.shapes[name]) - 1)))

    def use_flat_gradients(self) -> bool:
        """From now on, gradients accumulate into one flat buffer and the update runs over all of it; only when the
        last step gave every parameter a gradient (torch.optim skips a parameter without one). Whether it does."""
        if not self.without_grad:
            self.flat = True
            self.updated.update(self.names)
            self.flat_grad.zero_()
            for name, leaf in self.params.items():
                leaf.grad = self.grads[name]
        return self.flat

    def clear_gradients(self) -> None:
        """Forget gradients of a step that was not completed (a failed capture)."""
        if self.flat:
            self.flat_grad.zero_()
        else:
            for leaf in self.params.values():
                leaf.grad = None

    @torch.no_grad()
    def reload(self, runs: Sequence[RunOptimizer]) -> None:
        """Copy each run's torch optimizer state into the stacked state, in place (a captured graph reads it)."""
        for k, run in enumerate(runs):
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                saved = run.optimizer.state.get(parameters[name], {})
                for key, stacked in self.state[name].items():
                    if saved.get(key) is None:
                        stacked[k].zero_()
                    else:
                        stacked[k].copy_(saved[key])  # Adam's step count: one number over the whole parameter

    @torch.no_grad()
    def write_back(self, runs: Sequence[RunOptimizer]) -> None:
        """Hand the stacked state to each run's torch optimizer (the reference object that checkpoints save)."""
        for k, run in enumerate(runs):
            parameters = dict(run.model.named_parameters())
            for name in self.names:
                if name not in self.updated and parameters[name] not in run.optimizer.state:
                    continue  # never had a gradient: torch.optim keeps no state for it either
                state = run.optimizer.state[parameters[name]]
                for key, stacked in self.state[name].items():
                    state[key] = self._saved(key, stacked[k])

    def _saved(self, key: str, value: Tensor) -> Tensor:
        return value.clone()

    def step(self, lrs: Tensor) -> None:
        """One update of every stacked parameter that has a gradient; ``lrs[j, k]`` is run k's learning rate of
        parameter ``names[j]``."""
        if self.flat:
            self.flat_step(self.layout.per_element(lrs.reshape(-1)))
            self.flat_grad.zero_()
            return
        self.without_grad = set()
        for j, name in enumerate(self.names):
            p = self.params[name]
            if p.grad is None:
                self.without_grad.add(name)
                continue
            self.parameter_step(name, p, lrs[j].view(-1, *([1] * (p.dim() - 1))))
            self.updated.add(name)
            p.grad = None

    def flat_step(self, lr: Tensor) -> None:
        """The update of every parameter at once (``lr``: each element's learning rate)."""
        raise NotImplementedError

    def parameter_step(self, name: str, p: Tensor, lr: Tensor) -> None:
        """The update of one parameter (``lr``: (K, 1, ...))."""
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
        self.weight_decay_values = self.values("weight_decay")
        self.momentum_values = self.values("momentum")
        nesterov = self.values("nesterov", dtype=torch.bool)
        self.nesterov_values = nesterov if bool(nesterov.any()) else None

    @torch.no_grad()
    def parameter_step(self, name: str, p: Tensor, lr: Tensor) -> None:
        assert p.grad is not None
        self._update(p, p.grad, self.state[name]["momentum_buffer"], lr, self.weight_decay[name],
                     self.momentum[name], self.nesterov[name])  # fmt: skip

    @torch.no_grad()
    def flat_step(self, lr: Tensor) -> None:
        spread = self.layout.per_element
        nesterov = None if self.nesterov_values is None else spread(self.nesterov_values)
        self._update(self.flat_param, self.flat_grad, self.flat_state["momentum_buffer"], lr,
                     spread(self.weight_decay_values), spread(self.momentum_values), nesterov)  # fmt: skip

    @staticmethod
    def _update(
        p: Tensor,
        grad: Tensor,
        buf: Tensor,
        lr: Tensor,
        weight_decay: Tensor,
        momentum: Tensor,
        nesterov: Tensor | None,
    ) -> None:
        d_p = grad + weight_decay * p
        buf.mul_(momentum).add_(d_p)
        update = buf if nesterov is None else torch.where(nesterov, d_p + momentum * buf, buf)
        p.sub_(lr * update)


class StackedAdam(StackedOptimizer):
    """torch.optim.Adam and AdamW (no amsgrad, not maximising), in one group: L2 weight decay for Adam runs,
    decoupled weight decay for AdamW runs, each run's betas and eps; torch's bias corrections from each run's
    own step count (kept for every element, so one flat update covers them)."""

    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> None:
        super().__init__(runs, params)
        self.hyper: dict[str, dict[str, Tensor]] = {}  # per parameter name: (K, 1, ...) per hyper-parameter
        rows: dict[str, list[float]] = {"beta1": [], "beta2": [], "eps": [], "l2": [], "decoupled": []}
        for j, name in enumerate(self.names):
            groups = self.param_groups[j]
            decoupled = [bool(g.get("decoupled_weight_decay", False)) for g in groups]
            decay = [g["weight_decay"] for g in groups]
            values = {
                "beta1": [g["betas"][0] for g in groups],
                "beta2": [g["betas"][1] for g in groups],
                "eps": [g["eps"] for g in groups],
                "l2": [0.0 if d else w for w, d in zip(decay, decoupled, strict=True)],
                "decoupled": [w if d else 0.0 for w, d in zip(decay, decoupled, strict=True)],
            }
            self.hyper[name] = {key: self.broadcast(name, v) for key, v in values.items()}
            for key, v in values.items():
                rows[key] += v
        self.hyper_values = {
            key: torch.tensor(v, device=self.device, dtype=self.layout.dtype) for key, v in rows.items()
        }

    def _saved(self, key: str, value: Tensor) -> Tensor:
        if key == "step":  # a host scalar tensor, as torch.optim keeps it
            return torch.tensor(float(value.reshape(-1)[0]), dtype=_scalar_dtype())
        return value.clone()

    @torch.no_grad()
    def parameter_step(self, name: str, p: Tensor, lr: Tensor) -> None:
        assert p.grad is not None
        state = self.state[name]
        self._update(p, p.grad, state, lr, self.hyper[name])

    @torch.no_grad()
    def flat_step(self, lr: Tensor) -> None:
        hyper = {key: self.layout.per_element(values) for key, values in self.hyper_values.items()}
        self._update(self.flat_param, self.flat_grad, self.flat_state, lr, hyper)

    @staticmethod
    def _update(p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: Tensor, hyper: dict[str, Tensor]) -> None:
        step = state["step"].add_(1)
        p.mul_(1 - lr * hyper["decoupled"])  # AdamW runs; 1 exactly for Adam runs
        grad = grad + hyper["l2"] * p  # Adam runs; + 0 for AdamW runs
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).add_(grad * grad * (1 - beta2))
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(hyper["eps"])
        p.sub_(lr / bias_correction1 * state["exp_avg"] / denom)


def stacked_optimizer(family: str, runs: Sequence[RunOptimizer], params: dict[str, Tensor]) -> StackedOptimizer:
    """The stacked update of ``family`` (see :func:`optimizer_family`) over ``params`` (the trainable ones)."""
    return StackedSGD(runs, params) if family == SGD_FAMILY else StackedAdam(runs, params)
