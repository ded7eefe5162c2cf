"""How many runs fit in one fused step: an estimate made before the first step, so a large K is split into groups
that fit (or refused with a number that fits) instead of running out of device memory mid-epoch.

A stacked step of K runs holds K runs' activations at once. What one run's step keeps for its backward pass
is measured, not guessed: one forward pass of a copy of the run's model on 2 and on 4 samples, counting the bytes
of every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``); the difference is per sample,
and weights (saved at both sizes) cancel. The estimate of a group's step is then::

    K × (N × bytes per sample × HEADROOM + parameters × (2 + optimizer slots)) + K × N × input bytes

(the stacked parameters and their gradients, the optimizer's stacked state, the per-run copy of the batch).
``HEADROOM`` covers what a backward pass holds besides the saved tensors (the gradient of the current
activation and workspace); it is deliberately generous, since an estimate that is too low costs a crash.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

HEADROOM = 1.5
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """One run's share of a stacked step: bytes per training sample, and the bytes that do not grow with the batch."""

    per_sample: int
    per_run: int

    def group(self, runs: int, batch_size: int) -> int:
        """Bytes of a stacked step of ``runs`` runs on batches of ``batch_size``."""
        return runs * (math.ceil(batch_size * self.per_sample * HEADROOM) + self.per_run)

    def most_runs(self, batch_size: int, budget: int) -> int:
        """How many runs fit in ``budget`` bytes (0: not even one)."""
        return int(budget // max(self.group(1, batch_size), 1))


def saved_bytes(model: torch.nn.Module, x: Tensor, autocast: Callable[[], AbstractContextManager[Any]]) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of ``model(x)`` (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        model(x)
    return sum(storages.values())


def measure_step(
    model: torch.nn.Module,
    sample: Tensor,
    optimizer_slots: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> StepMemory:
    """What one run's step needs, measured on a copy of ``model`` (its BatchNorm statistics stay as they are) with
    ``sample`` (one input, (C, H, W)) repeated 2 and 4 times; ``optimizer_slots`` tensors of state per parameter."""
    probe = copy.deepcopy(model)  # training-mode BatchNorm would move the run's running statistics
    batch = sample.unsqueeze(0)
    two = saved_bytes(probe, batch.expand(2, *sample.shape).clone(), autocast)
    four = saved_bytes(probe, batch.expand(4, *sample.shape).clone(), autocast)
    per_sample = max(four - two, 0) // 2 + sample.numel() * sample.element_size()  # + the run's copy of the input
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return StepMemory(per_sample=per_sample, per_run=trainable * (2 + optimizer_slots) + frozen + buffers)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``: free memory plus what PyTorch's cache holds unused.
    None off CUDA (host memory is not what runs out first there)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def describe(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.0f} MiB"
