"""data_parallel: one DDP wrapper per run, so each run's gradients are averaged over the ranks."""

from __future__ import annotations

import functools
import gc
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ibcore.engine.distributed import Distributed
from ibcore.engine.runs import RunState


class _ForwardAdapter(nn.Module):
    """Routes both forward kinds (plain, and mixed at a hidden layer) through one ``forward``, so DDP sees both."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        if layer == 0:
            return self.model(x)  # type: ignore[no-any-return]
        return self.model.forward_mixed(x, layer, mix)  # type: ignore[operator,no-any-return]


def plain_forward(
    model: nn.Module, x: torch.Tensor, layer: int = 0, mix: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """A model's logits, with ``mix`` applied at block ``layer`` when ``layer > 0``."""
    if layer == 0:
        return model(x)  # type: ignore[no-any-return]
    return model.forward_mixed(x, layer, mix)  # type: ignore[operator,no-any-return]


class DataParallelModels:
    """The DDP wrapper of every active run, rebuilt when its trainable parameters change (classifier
    re-training)."""

    def __init__(self, dist: Distributed, device: torch.device) -> None:
        self.dist = dist
        self.device = device
        self.wrappers: dict[str, tuple[Any, nn.Module]] = {}  # run name -> (its parameters' identity, DDP wrapper)

    def prepare(self, active: Sequence[RunState], changed: set[str]) -> None:
        from torch.nn.parallel import DistributedDataParallel

        names = {run.name for run in active}
        for name in [name for name in self.wrappers if name not in names]:
            del self.wrappers[name]
        rebuilt = False
        for run in active:
            if run.name in changed:
                # A starting stage may have re-initialised a part of the model from this rank's RNG.
                self.dist.broadcast_module(run.model)
            key = tuple((id(p), p.requires_grad) for p in run.model.parameters())
            current = self.wrappers.get(run.name)
            if current is not None and current[0] == key:
                continue
            if current is not None:
                del self.wrappers[run.name]
                del current
                rebuilt = True
            wrapper = DistributedDataParallel(
                _ForwardAdapter(run.model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **_no_buffer_sync_per_forward(),
            )
            self.wrappers[run.name] = (key, wrapper)
        if rebuilt:
            gc.collect()  # release the old reducers' hooks before the next backward

    def forward_of(self, run: RunState) -> Callable[..., torch.Tensor]:
        """The run's forward: through its DDP wrapper when it has one, so the gradients are averaged."""
        wrapped = self.wrappers.get(run.name)
        if wrapped is None:
            return functools.partial(plain_forward, run.model)
        wrapper = wrapped[1]
        return lambda x, layer=0, mix=None: wrapper(x, layer, mix)

    def clear(self) -> None:
        self.wrappers.clear()


@functools.cache
def _no_buffer_sync_per_forward() -> dict[str, Any]:
    """DDP's switch for not broadcasting buffers before every forward (renamed in newer PyTorch).

    BatchNorm running statistics are copied from rank 0 at the end of every epoch instead.
    """
    from torch.nn.parallel import DistributedDataParallel

    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
