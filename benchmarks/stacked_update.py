"""The optimizer update of K stacked runs: parameter by parameter against one flat update (not a test).

A fused group's update (``ibcore/engine/steps/stacked_optim.py``) first runs parameter by parameter; after its
first step shows that every parameter gets a gradient, gradients accumulate into one flat buffer and the update
is a few kernels over all of it. This times both on the same stacked ResNet-32 parameters, in one process, and
counts the operators each launches (with the profiler): on a GPU every operator is at least one kernel, which a
CUDA graph replays but still runs one after another.

    python benchmarks/stacked_update.py --device cpu --runs 1,8
    python benchmarks/stacked_update.py --device cuda --runs 8,32,64

On 2 CPU cores (2026-11-30): SGD 760 operators → 10, Adam/AdamW 2,565 → 32; time at K = 1: 1.10× (SGD) and 1.79×
(Adam) faster flat, at K = 8 much slower flat (0.07×, 0.19×: full-size temporaries), which is why the engine
uses the flat update on CUDA only. Not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
from torch.func import stack_module_state
from torch.profiler import ProfilerActivity, profile

import ibcore
from ibcore.engine.steps.stacked_optim import StackedAdam, StackedOptimizer, StackedSGD


def stacked(kind: str, k: int, device: torch.device) -> StackedOptimizer:
    """K ResNet-32 models' parameters stacked, with their torch optimizers, and gradients in place."""
    context = ibcore.BuildContext(num_classes=10, class_counts=tuple([100] * 10))
    models = [ibcore.build("backbone", "resnet32", {}, context=context).to(device) for _ in range(k)]
    make = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4),
        "adam": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=5e-2),
    }[kind]
    runs = [types.SimpleNamespace(model=m, optimizer=make(m)) for m in models]
    params, _ = stack_module_state(models)  # type: ignore[arg-type]
    optimizer = (StackedSGD if kind == "sgd" else StackedAdam)(runs, {n: p.detach() for n, p in params.items()})
    for leaf in optimizer.params.values():
        leaf.grad = torch.randn_like(leaf)
    return optimizer


def timed(step: object, device: torch.device, repeats: int) -> float:
    """Milliseconds per call of ``step``."""
    for _ in range(3):
        step()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / repeats


def operators(step: object, device: torch.device) -> int:
    """aten operators one call launches (each is at least one kernel on a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()  # type: ignore[operator]
    # top-level aten calls only (an op's own sub-calls are part of it)
    return sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None)


def compare(kind: str, k: int, device: torch.device, repeats: int) -> None:
    """Time and count one update of ``k`` stacked runs both ways."""
    optimizer = stacked(kind, k, device)
    lrs = torch.full((len(optimizer.names), k), 0.01, device=device)
    grads = {name: leaf.grad for name, leaf in optimizer.params.items()}

    def per_parameter() -> None:
        for name, leaf in optimizer.params.items():
            leaf.grad = grads[name]  # the per-parameter update drops each gradient after using it
        optimizer.step(lrs)

    def flat() -> None:
        optimizer.flat_step(optimizer.layout.per_element(lrs.reshape(-1)))

    per_ms, per_ops = timed(per_parameter, device, repeats), operators(per_parameter, device)
    optimizer.use_flat_gradients()
    optimizer.flat_grad.normal_()
    flat_ms, flat_ops = timed(flat, device, repeats), operators(flat, device)
    print(
        f"{kind:4s} K={k:3d}: parameter by parameter {per_ms:7.2f} ms ({per_ops} operators), "
        f"flat {flat_ms:7.2f} ms ({flat_ops} operators): {per_ms / flat_ms:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default="8")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}; torch {torch.__version__}; ResNet-32 (stacked parameters, random gradients)")
    for kind in ("sgd", "adam"):
        for k in (int(v) for v in args.runs.split(",")):
            compare(kind, k, device, args.repeats)


if __name__ == "__main__":
    main()
