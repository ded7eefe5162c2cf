"""BatchNorm for K stacked runs as one call over K·C channels (the fused path's vmap rule).

BatchNorm normalises each channel on its own, so K runs' BatchNorm layers over C channels are exactly one
BatchNorm over K·C channels, with the runs' weights, biases and running statistics laid end to end. Under
``vmap`` the run axis of an activation already sits next to its channels (grouped convolutions put it there),
so the (N, K, C, ...) activation is viewed as (N, K·C, ...) without a copy and goes through one
``F.batch_norm`` (one cuDNN kernel on a GPU, forward and backward). ``vmap``'s own BatchNorm rule instead
decomposes the batched weights and the backward into reductions and elementwise kernels: on an H100 that
was 36 % of a fused ResNet-32 step's GPU time (docs/performance.md).

Only the skeleton module of a fused group uses this (see :func:`stack_batchnorm`); the running statistics
are updated in place in the stacked buffers, as ``nn.BatchNorm`` does.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PLAIN_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _StackedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm whose ``vmap`` rule is one batch norm over K·C channels."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        # Outside vmap (one run): plain batch norm. The fused path only ever calls it under vmap.
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, _, _, _, eps = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Recompute the forward from the saved input (batch statistics, no running-stat update).
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias)]
            assert leaves[0] is not None
            out = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.0, ctx.eps)
            grads = iter(torch.autograd.grad(out, [t for t in leaves if t is not None], grad))
        return *(None if t is None else next(grads) for t in leaves), None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, *args: Any) -> tuple[Tensor, int]:
        weight, bias, running_mean, running_var, momentum, eps = args
        k = info.batch_size
        x_dim, weight_dim, bias_dim, mean_dim, var_dim = in_dims[:5]
        if x_dim is None:  # one input for every run (BatchNorm on the data itself): repeat it per run
            x = x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:])
        else:
            x = x.movedim(x_dim, 1)
        n, c, rest = x.shape[0], x.shape[2], x.shape[3:]

        def per_channel(t: Tensor | None, dim: int | None) -> Tensor | None:
            if t is None:
                return None
            return t.repeat(k) if dim is None else t.movedim(dim, 0).reshape(k * c)

        def running(t: Tensor | None, dim: int | None) -> Tensor | None:
            if t is None:
                return None
            if dim is None:
                raise RuntimeError("stacked BatchNorm needs per-run running statistics (stack_module_state)")
            return t.movedim(dim, 0).view(k * c)  # a view: the update lands in the stacked buffer

        out = F.batch_norm(
            x.reshape(n, k * c, *rest),
            running(running_mean, mean_dim),
            running(running_var, var_dim),
            per_channel(weight, weight_dim),
            per_channel(bias, bias_dim),
            True,
            momentum,
            eps,
        )
        return out.view(n, k, c, *rest), 1


def _stacked_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``nn.BatchNorm*.forward`` in training mode with a fixed momentum, through :class:`_StackedBatchNorm`."""
    if not self.training:  # running statistics only: the class's own forward (a fused skeleton always trains)
        return type(self).forward(self, x)  # type: ignore[no-any-return]
    self._check_input_dim(x)  # type: ignore[attr-defined]
    if self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
    assert self.momentum is not None
    return _StackedBatchNorm.apply(  # type: ignore[no-any-return]
        x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps
    )


def stack_batchnorm(skeleton: nn.Module) -> int:
    """Give the plain BatchNorm layers of a fused group's skeleton the stacked rule; return how many.

    Subclasses (SyncBatchNorm, layers with their own forward) and ``momentum=None`` (a cumulative average
    that needs the batch count as a number) keep ``vmap``'s generic rule.
    """
    count = 0
    for module in skeleton.modules():
        if type(module) in _PLAIN_BATCHNORM and module.momentum is not None:  # type: ignore[attr-defined]
            module.forward = types.MethodType(_stacked_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
