"""Stacked BatchNorm (the fused path's vmap rule): K runs' BatchNorm layers as one call over K·C channels.

The reference is each run's own ``nn.BatchNorm`` in training mode: outputs, gradients of input, weight and
bias, and the running statistics it updates must match to float64 rounding.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ibcore.engine.stacked_norm import _StackedBatchNorm, stack_batchnorm

K = 3


def stacked_and_reference(layer: nn.Module, x: torch.Tensor, x_dim: int | None) -> dict[str, Any]:
    """Run K copies of ``layer`` (perturbed differently) stacked under vmap and one by one; return both."""
    torch.manual_seed(0)
    layers = [copy.deepcopy(layer).double().train() for _ in range(K)]
    for module in layers:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
    inputs = [x.select(x_dim, k) if x_dim is not None else x for k in range(K)]
    upstream = torch.randn(K, *inputs[0].shape, dtype=torch.float64)

    # reference: each run on its own
    reference = copy.deepcopy(layers)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = [m(t) for m, t in zip(reference, ref_inputs, strict=True)]
    sum((o * g).sum() for o, g in zip(outputs, upstream, strict=True)).backward()

    # stacked: the skeleton's BatchNorm replaced by the stacked rule
    params, buffers = stack_module_state(copy.deepcopy(layers))  # type: ignore[arg-type]
    params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in buffers.items()}
    skeleton = copy.deepcopy(layers[0]).to("meta")
    assert stack_batchnorm(skeleton) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in skeleton.modules())
    stacked_x = x.detach().clone().requires_grad_()
    out = vmap(lambda p, b, t: functional_call(skeleton, (p, b), (t,)), in_dims=(0, 0, x_dim))(
        params, buffers, stacked_x
    )
    (out * upstream).sum().backward()
    return {
        "out": (out, torch.stack(outputs)),
        "grad_x": (
            stacked_x.grad.movedim(x_dim, 0) if x_dim is not None else stacked_x.grad,
            torch.stack([t.grad for t in ref_inputs]) if x_dim is not None else sum(t.grad for t in ref_inputs),
        ),
        "params": {
            n: (params[n].grad, torch.stack([dict(m.named_parameters())[n].grad for m in reference])) for n in params
        },
        "buffers": {n: (buffers[n], torch.stack([dict(m.named_buffers())[n] for m in reference])) for n in buffers},
    }


def assert_all_close(result: dict[str, Any]) -> None:
    torch.testing.assert_close(*result["out"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(*result["grad_x"], atol=1e-10, rtol=1e-10)
    for name, (got, want) in {**result["params"], **result["buffers"]}.items():
        torch.testing.assert_close(got.to(want.dtype), want, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_batchnorm2d_matches_each_run_alone(channels_last: bool) -> None:
    x = torch.randn(K, 8, 4, 5, 5, dtype=torch.float64)
    if channels_last:  # the layout the engine trains in: (K, N, C, H, W) with channels innermost
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert_all_close(stacked_and_reference(nn.BatchNorm2d(4, momentum=0.3), x, x_dim=0))


def test_stacked_batchnorm_with_the_run_axis_beside_the_channels() -> None:
    # After a grouped convolution vmap keeps activations as (N, K, C, ...): the rule must not copy them.
    x = torch.randn(8, K, 4, 3, 3, dtype=torch.float64)
    assert_all_close(stacked_and_reference(nn.BatchNorm2d(4), x.movedim(1, 0), x_dim=0))
    assert_all_close(stacked_and_reference(nn.BatchNorm2d(4), x, x_dim=1))


def test_stacked_batchnorm1d_and_a_shared_input() -> None:
    assert_all_close(stacked_and_reference(nn.BatchNorm1d(6), torch.randn(K, 10, 6, dtype=torch.float64), x_dim=0))
    # one input for every run (BatchNorm directly on the data)
    assert_all_close(stacked_and_reference(nn.BatchNorm1d(6), torch.randn(10, 6, dtype=torch.float64), x_dim=None))


def test_stacked_batchnorm_without_affine_parameters_or_running_statistics() -> None:
    x = torch.randn(K, 8, 4, 3, 3, dtype=torch.float64)
    assert_all_close(stacked_and_reference(nn.BatchNorm2d(4, affine=False), x, x_dim=0))
    assert_all_close(stacked_and_reference(nn.BatchNorm2d(4, track_running_stats=False), x, x_dim=0))


def test_layers_the_stacked_rule_cannot_serve_keep_vmaps_rule() -> None:
    class OwnForward(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=None), OwnForward(3), nn.SyncBatchNorm(3))
    assert stack_batchnorm(model) == 1
    assert "forward" in vars(model[0]) and not any("forward" in vars(m) for m in model[1:])


def test_the_function_outside_vmap_is_batch_norm_with_its_gradient() -> None:
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    out = _StackedBatchNorm.apply(x, weight, bias, mean, var, 0.1, 1e-5)
    torch.testing.assert_close(out, nn.functional.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5))
    assert torch.allclose(mean, 0.1 * x.detach().mean(dim=(0, 2, 3)))  # running statistics updated in place
    assert torch.autograd.gradcheck(
        lambda a, w, b: _StackedBatchNorm.apply(a, w, b, None, None, 0.1, 1e-5), (x, weight, bias)
    )


def test_a_skeleton_in_eval_mode_uses_the_running_statistics() -> None:
    layer = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
    stack_batchnorm(layer)
    layer.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), (x - 1.0) / torch.sqrt(torch.tensor(1.0 + layer.eps, dtype=torch.float64)))
