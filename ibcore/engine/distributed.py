"""Training over several processes launched by ``torchrun``: the process group, the split of the work, collectives.

Two modes (``trainer.distributed.mode``):

- ``data_parallel``: every rank holds every run, wrapped in ``DistributedDataParallel``; each global
  batch of ``data.batch_size`` is split between the ranks (rank ``r`` takes positions ``r, r + w, ...``
  of the epoch's stream, see :func:`rank_indices`), so with mean-reduced losses the averaged gradient
  is the full-batch gradient. Evaluation splits the test set between the ranks and gathers the logits.
- ``runs_parallel``: rank ``r`` trains ``runs[r::w]`` on the full batch stream, as a single process
  would; the ranks exchange metric lines, and rank 0 gathers the runs' states for checkpoints.

In both modes every rank computes the same index stream (a pure function of seed and epoch) and
only rank 0 writes files. With one process (no ``torchrun``, or ``--nproc_per_node=1``) every
collective here is the identity, so a single-process run is unchanged by this module.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ibcore.config.schema import TrainerConfig
from ibcore.errors import TrainingError
from ibcore.sampling import shard

DATA_PARALLEL = "data_parallel"
RUNS_PARALLEL = "runs_parallel"
DUMP_INDICES_ENV = "IB_DUMP_INDICES"  # a folder: every rank writes the indices it trains on (tests, debugging)


@dataclasses.dataclass
class Distributed:
    """Where this process stands in a distributed run: rank, world size, mode, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = DATA_PARALLEL
    backend: str | None = None
    sync_batchnorm: bool = False
    device: torch.device | None = None
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def splits_batches(self) -> bool:
        """data_parallel with more than one process: DDP, each rank a slice of each batch."""
        return self.enabled and self.mode == DATA_PARALLEL

    @property
    def splits_runs(self) -> bool:
        """runs_parallel with more than one process: each rank trains its own runs."""
        return self.enabled and self.mode == RUNS_PARALLEL

    def local_batch(self, batch_size: int) -> int:
        """This rank's share of the global ``batch_size``: ``batch_size / world`` under data_parallel."""
        if not self.splits_batches:
            return batch_size
        if batch_size % self.world_size:
            raise TrainingError(
                f"data.batch_size is {batch_size}, but under data_parallel it is the global batch, split evenly "
                f"between the {self.world_size} processes: use a multiple of {self.world_size} "
                "(or trainer.distributed.mode: runs_parallel)"
            )
        return batch_size // self.world_size

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "mode": self.mode, "backend": self.backend}

    # -- collectives (identities with one process) ---------------------------------------------

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (small picklable objects: metric lines, RNG states)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def gather_object(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [value]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def all_gather_rows(self, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate each rank's ``tensor`` (rank ``r`` holds ``counts[r]`` rows) in rank order, on every rank."""
        if not self.enabled:
            return tensor
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> bool:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers into ``module``; True if any differed."""
        if not self.enabled:
            return False
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        differed = torch.zeros((), device=self.device)
        for tensor in tensors:
            before = tensor.detach().clone()
            dist.broadcast(tensor.data, src=0)
            differed += (before != tensor.data).any().to(differed.dtype)
        dist.all_reduce(differed)
        return bool(differed.item())

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.backend == "nccl" and self.device is not None:
            dist.barrier(device_ids=[self.device.index or 0])  # NCCL would otherwise guess the GPU
        else:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group we created. Collect garbage first: DDP wrappers left in reference
        cycles keep the group alive past this point, and a gloo group destroyed during interpreter
        shutdown aborts the process ("terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
            self.owns_group = False

    def _object_device(self) -> torch.device | None:
        # NCCL moves pickled objects through CUDA tensors on this rank's GPU; gloo through the CPU.
        return self.device if self.backend == "nccl" else None


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment ``torchrun`` sets; (0, 1, 0) without it."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError as exc:
            raise TrainingError(f"environment variable {name}={value!r} is not an integer") from exc

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise TrainingError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local_rank


def choose_backend(requested: str, device: torch.device) -> str:
    """The process-group backend for ``device``; a clear error when it is not available here."""
    if not dist.is_available():
        raise TrainingError("this PyTorch build has no torch.distributed support; run without torchrun (one process)")
    backend = requested if requested != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise TrainingError(
            f"trainer.distributed.backend is 'nccl', which needs CUDA devices, but the device is {device.type!r}; "
            "use backend: gloo (or auto) to train on the CPU"
        )
    available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}
    if not available[backend]:
        others = [name for name, ok in available.items() if ok and name != backend]
        hint = f"; available here: {', '.join(others)}" if others else "; no backend is available in this build"
        raise TrainingError(
            f"torch.distributed backend {backend!r} is not available in this PyTorch build "
            f"(torch {torch.__version__}){hint}. Set trainer.distributed.backend accordingly."
        )
    return backend


def init_distributed(trainer: TrainerConfig, device: torch.device) -> Distributed:
    """Join the process group ``torchrun`` set up the environment for; a single-process context without it.

    ``device`` is the resolved ``trainer.device``; under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.
    """
    config = trainer.distributed
    rank, world, local_rank = launched_world()
    if world == 1:
        return Distributed(mode=config.mode, sync_batchnorm=config.sync_batchnorm, device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise TrainingError(f"distributed training supports CUDA and CPU devices, not {device.type!r}")
    backend = choose_backend(config.backend, device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise TrainingError("a process group is already initialised with another rank or world size")
    return Distributed(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        mode=config.mode,
        backend=backend,
        sync_batchnorm=config.sync_batchnorm,
        device=device,
        owns_group=owns,
    )


# -- the split of an epoch ------------------------------------------------------------------------


def rank_indices(order: np.ndarray, rank: int, world_size: int, global_batch: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s part of an epoch's stream under data_parallel, in the order it trains on it.

    The stream is split with :func:`ibcore.sampling.shard` (``padded[rank::world_size]``, the stream
    padded by wrapping around to a multiple of ``world_size``). Cut into batches of
    ``global_batch // world_size``, the ranks' j-th batches together are exactly positions
    ``[j * global_batch, (j + 1) * global_batch)`` of the stream: the single-process j-th batch.
    With ``drop_last`` the stream is first cut to whole global batches (no padding is then needed).
    Otherwise the last global batch of an epoch gets ``(-len(order)) % world_size`` repeated samples
    from the start of the stream, so that every rank's last batch has the same size.
    """
    stream = np.asarray(order, dtype=np.int64)
    if drop_last:
        stream = stream[: (len(stream) // global_batch) * global_batch]
    return shard(stream, rank, world_size)


def eval_counts(num_samples: int, world_size: int) -> list[int]:
    """How many test samples each rank evaluates: contiguous blocks, no sample twice, none left out."""
    return [len(part) for part in np.array_split(np.arange(num_samples), world_size)]


def eval_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous block of the test set (gathered in rank order, the blocks are the whole set)."""
    counts = eval_counts(num_samples, world_size)
    start = sum(counts[:rank])
    return np.arange(start, start + counts[rank], dtype=np.int64)


def dump_indices(rank: int, epoch: int, key: str, indices: np.ndarray) -> None:
    """With ``IB_DUMP_INDICES=DIR``: append the indices this rank trains on in ``epoch`` (tests, debugging)."""
    folder = os.environ.get(DUMP_INDICES_ENV)
    if not folder:
        return
    path = Path(folder) / f"indices-rank{rank}-epoch{epoch}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"sampler": key, "indices": [int(i) for i in indices]}) + "\n")


def check_resume_world(state: dict[str, Any], current: Distributed, run_dir: Path | str) -> None:
    """Refuse a checkpoint written by another number of processes or another mode (the split would differ)."""
    saved = state.get("distributed") or {"world_size": 1, "mode": DATA_PARALLEL}
    saved_world = int(saved.get("world_size", 1))
    saved_mode = str(saved.get("mode", DATA_PARALLEL))
    same_mode = saved_world == 1 or saved_mode == current.mode
    if saved_world == current.world_size and same_mode:
        return
    launch = (
        f"torchrun --nproc_per_node={saved_world} -m ibcore.cli resume {run_dir}"
        if saved_world > 1
        else f"ib resume {run_dir} (without torchrun)"
    )
    where = f"{saved_world} process{'es' if saved_world != 1 else ''}" + (
        f" in {saved_mode} mode" if saved_world > 1 else ""
    )
    now = f"{current.world_size} process{'es' if current.world_size != 1 else ''}" + (
        f" in {current.mode} mode" if current.world_size > 1 else ""
    )
    raise TrainingError(
        f"the checkpoint in {run_dir} was written by {where}, but this resume runs {now}; "
        f"a resumed run must keep the world size and mode to reach the same numbers. Resume with: {launch}"
    )


# -- BatchNorm over the global batch --------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks, on any device.

    ``torch.nn.SyncBatchNorm`` does this with fused kernels but only on GPUs; this version (two
    differentiable all-reduces per layer: the sums, then the squared deviations from the global
    mean) also runs with gloo on the CPU. Evaluation and single-process use are plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() / input.shape[1])
        sums = _AllReduceSum.apply(torch.cat([input.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / total
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(total)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` computing global-batch statistics (state dict keys unchanged).

    On CUDA: ``torch.nn.SyncBatchNorm``; elsewhere :class:`GlobalBatchNorm`.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.to(device)
        if module.affine:  # the same Parameter objects, so nothing that holds them goes stale
            converted.weight = module.weight
            converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device))
    return module


__all__ = [
    "DATA_PARALLEL",
    "DUMP_INDICES_ENV",
    "RUNS_PARALLEL",
    "Distributed",
    "GlobalBatchNorm",
    "check_resume_world",
    "choose_backend",
    "convert_batchnorm",
    "eval_counts",
    "eval_indices",
    "init_distributed",
    "launched_world",
    "rank_indices",
]
