"""Split one epoch's sampler stream between the processes of a distributed run.

Every sampler's stream is a pure function of (seed, epoch), so each rank computes the same full
stream and keeps its own slice; no rank needs to talk to another to agree on the order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}.")


def shard_length(num_indices: int, world_size: int) -> int:
    """How many indices each rank gets from a stream of ``num_indices``: ``ceil(num_indices / world_size)``."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}.")
    return math.ceil(num_indices / world_size)


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s slice of an epoch's index stream: ``padded[rank::world_size]``.

    The rule (that of ``torch.utils.data.DistributedSampler`` with ``drop_last=False``): the stream
    is padded to the next multiple of ``world_size`` by wrapping around to its start (repeating it
    again if it is shorter than the padding), then rank ``r`` takes positions ``r, r + w, r + 2w,
    ...``. Every rank gets ``ceil(n / w)`` indices; the last ``(-n) % w`` ranks' final index is a
    repeat from the start of the stream, so the ranks together see every index at least once.
    """
    _check_rank(rank, world_size)
    stream = np.asarray(indices, dtype=np.int64)
    total = shard_length(len(stream), world_size) * world_size
    padded = np.resize(stream, total) if total != len(stream) else stream  # np.resize repeats cyclically
    return padded[rank::world_size]


class ShardedSampler:
    """A sampler that yields only one rank's disjoint slice of another sampler's stream (see :func:`shard`)."""

    def __init__(self, sampler: Any, rank: int, world_size: int) -> None:
        _check_rank(rank, world_size)
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's int64 indices for ``epoch``."""
        return shard(self.sampler.indices(epoch), self.rank, self.world_size)

    def __len__(self) -> int:
        return shard_length(len(self.sampler), self.world_size)

    @property
    def num_samples(self) -> int:
        return len(self)


__all__ = ["ShardedSampler", "shard", "shard_length"]
