"""Samplers and the training batches they draw, grouped in lanes that step in lockstep.

Runs of one seed whose sampler specs are equal draw the same batches. Such groups whose epochs are
equally long (the same sampler at other seeds) form a lane: their batches come in lockstep, so the
fused step can stack the runs of every seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ibcore.build import build
from ibcore.config.schema import ComponentSpec, DataConfig
from ibcore.engine.augment import STANDARD, augment_pixels, policy_parts
from ibcore.engine.batches import DeviceData, crop_and_flip
from ibcore.engine.distributed import Distributed, dump_indices, rank_indices
from ibcore.engine.experiment_data import SeedData
from ibcore.engine.runs import RunState, spec_key
from ibcore.engine.seeding import derive_seed
from ibcore.errors import DataError
from ibcore.protocols import Augmentation, Batch, Sampler

Lane = tuple[str, int]  # (sampler spec key, batches per epoch)
Group = tuple[int, str]  # (seed, sampler spec key): runs that share every batch


def iters_per_epoch(indices: int, batch_size: int, drop_last: bool) -> int:
    return indices // batch_size if drop_last else math.ceil(indices / batch_size)


class Lanes:
    """Every sampler of the experiment (one per distinct seed and spec) and the batch streams they give."""

    def __init__(
        self, data_config: DataConfig, data: dict[int, SeedData], dist: Distributed, channels_last: bool
    ) -> None:
        self.config = data_config
        self.data = data
        self.dist = dist
        self.channels_last = channels_last
        self.local_batch = dist.local_batch(data_config.batch_size)  # this rank's share under data_parallel
        self.samplers: dict[Group, Sampler] = {}
        self.policies: dict[str, Augmentation | None] = {}  # augmentation spec key -> policy (None: none)

    def sampler(self, run: RunState, spec: ComponentSpec) -> Sampler:
        """The sampler built from ``spec`` for ``run``'s seed (shared by the runs that name it)."""
        key = (run.seed, spec_key(spec))
        if key not in self.samplers:
            self.samplers[key] = build("sampler", spec.name, spec.params, context=run.context)
        return self.samplers[key]

    def iters(self, sampler: Sampler) -> int:
        return iters_per_epoch(len(sampler), self.config.batch_size, self.config.drop_last)

    def lane_of(self, run: RunState) -> Lane:
        assert run.specs is not None
        key = spec_key(run.specs.sampler)
        return key, self.iters(self.samplers[(run.seed, key)])

    def lanes(self, runs: Sequence[RunState]) -> dict[Lane, dict[Group, list[RunState]]]:
        """The runs by lane, and within a lane by the group that shares every batch."""
        lanes: dict[Lane, dict[Group, list[RunState]]] = defaultdict(lambda: defaultdict(list))
        for run in runs:
            assert run.specs is not None
            lanes[self.lane_of(run)][(run.seed, spec_key(run.specs.sampler))].append(run)
        return lanes

    def images_per_epoch(self, runs: Sequence[RunState]) -> int:
        return sum(len(self.samplers[k]) for k in {(r.seed, spec_key(r.specs.sampler)) for r in runs if r.specs})

    def policy(self, run: RunState, spec: ComponentSpec | None) -> tuple[str, Augmentation | None]:
        """The augmentation policy built from ``spec`` (None: the dataset's own only) and its key."""
        if spec is None or (spec.name == STANDARD and not spec.params):
            return STANDARD, None
        key = spec_key(spec)
        if key not in self.policies:
            built = build("augmentation", spec.name, spec.params, context=run.context)
            self.policies[key] = None if not policy_parts(built) else built
        return (key, self.policies[key]) if self.policies[key] is not None else (STANDARD, None)

    def batches(
        self, epoch: int, group: Group, runs: Sequence[RunState], shard: tuple[int, int]
    ) -> Iterator[dict[str, Batch]]:
        """The training batches of ``epoch`` for the ``runs`` of ``group`` (under data_parallel: this rank's
        slice), by run name: runs with equal augmentation share one :class:`Batch`."""
        seed, key = group
        rank, world = shard
        drop_last = self.config.drop_last
        order: Any = self.samplers[group].indices(epoch)
        if world > 1:
            order = rank_indices(order, rank, world, self.config.batch_size, drop_last)
        dump_indices(self.dist.rank, epoch, key, order)
        data = self.data[seed].train
        on_device = isinstance(data, DeviceData)
        generator = torch.Generator(device=data.device if isinstance(data, DeviceData) else "cpu")
        # Device augmentation draws for the whole global batch on every rank (same seed); see augment_batch.
        per_rank = ("rank", rank) if world > 1 and not on_device else ()
        generator.manual_seed(derive_seed(seed, "augment", key, epoch, *per_rank))
        run_keys, policies = self._augmentations(runs)
        if not isinstance(data, DeviceData):
            if set(policies) != {STANDARD}:
                raise DataError(
                    "augmentation policies and views are applied on the device: they need a dataset held as tensors "
                    "(CIFAR, MNIST, array_file) and trainer.data_on_device not 'off'"
                )
            for x, y in data.iterate(order, self.local_batch, generator, True, drop_last, shard):
                batch = Batch(self._layout(x), y)
                yield {run.name: batch for run in runs}
            return
        # Each policy (and each view's crop) draws from its own stream, so a run's images do not depend on which
        # other policies train beside it.
        streams, crops = {}, {}
        for policy_key in policies:
            streams[policy_key] = torch.Generator()
            streams[policy_key].manual_seed(derive_seed(seed, "augment", key, epoch, "policy", policy_key))
            if "#view" in policy_key:
                crops[policy_key] = torch.Generator(device=data.device)
                crops[policy_key].manual_seed(derive_seed(seed, "augment", key, epoch, "crop", policy_key))
        needed = list(dict.fromkeys(k for keys in run_keys.values() for k in keys))
        for pixels, y, images in data.iterate_pixels(order, self.local_batch, generator, True, drop_last, shard):
            tensors = {}
            for k in needed:
                # The main batch keeps the shared crop and flip; every view crops and flips the images anew.
                cropped = crop_and_flip(images, data.augment, crops[k], True, shard) if k in crops else pixels
                tensors[k] = self._layout(augment_pixels(cropped, data.augment, policies[k], streams[k], shard))
            shared = {
                keys: Batch(tensors[keys[0]], y, tuple(tensors[k] for k in keys[1:])) for keys in run_keys.values()
            }
            yield {name: shared[keys] for name, keys in run_keys.items()}

    def _augmentations(
        self, runs: Sequence[RunState]
    ) -> tuple[dict[str, tuple[str, ...]], dict[str, Augmentation | None]]:
        """Per run, the keys of its batch's policy and of its views' policies; and the policy of each key.

        A view has a key of its own per position, so two views with one policy draw differently, and runs with
        equal view lists share every draw."""
        run_keys: dict[str, tuple[str, ...]] = {}
        policies: dict[str, Augmentation | None] = {}
        for run in runs:
            main_key, main = self.policy(run, run.config.augmentation)
            policies[main_key] = main
            keys = [main_key]
            for position, spec in enumerate(run.config.views):
                policy_key, policy = self.policy(run, spec)
                view_key = f"{policy_key}#view{position}"
                policies[view_key] = policy
                keys.append(view_key)
            run_keys[run.name] = tuple(keys)
        return run_keys, policies

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x
