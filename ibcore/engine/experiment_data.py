"""The data of an experiment: its dataset built once, or once per seed when the dataset draws from it.

A dataset that draws a subset declares a ``subset_seed`` param; left unset, it follows the run's seed
(``BuildContext.seed``). Runs repeated over seeds then each train on their own seed's subset, exactly
as separate experiments would; every other dataset is built once and shared by all seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.context import BuildContext
from ibcore.engine.batches import DeviceData, LoaderData, make_data
from ibcore.engine.seeding import derive_seed
from ibcore.errors import DataError
from ibcore.registry import resolve


@dataclasses.dataclass
class SeedData:
    """One built dataset: what components may know about it, and its splits ready for the loops."""

    context: BuildContext  # num_classes, class_counts, targets; the seed it was drawn with
    train: DeviceData | LoaderData
    test: DeviceData | LoaderData
    val: DeviceData | LoaderData | None

    @property
    def num_classes(self) -> int:
        assert self.context.num_classes is not None
        return self.context.num_classes

    @property
    def class_counts(self) -> list[int]:
        return list(self.context.class_counts or ())


def follows_seed(experiment: Experiment) -> bool:
    """Whether the dataset's subset draw follows the run's seed (a ``subset_seed`` param left unset)."""
    spec = experiment.data.dataset
    params_model = resolve("dataset", spec.name).params
    if params_model is None or "subset_seed" not in params_model.model_fields:
        return False
    return getattr(params_model.model_validate(spec.params), "subset_seed", None) is None


def load_data(
    experiment: Experiment, seeds: list[int], device: torch.device, base: BuildContext
) -> dict[int, SeedData]:
    """The data each seed trains on: one build per seed when the dataset follows the seed, else one for all."""
    if follows_seed(experiment) and len(seeds) > 1:
        return {seed: _build(experiment, seed, device, base) for seed in seeds}
    shared = _build(experiment, seeds[0], device, base)
    return dict.fromkeys(seeds, shared)


def _build(experiment: Experiment, seed: int, device: torch.device, base: BuildContext) -> SeedData:
    spec = experiment.data.dataset
    context = base.replace(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dataset"))  # for a dataset that draws from torch's global stream
        dataset = build("dataset", spec.name, spec.params, context=context)
    train = dataset.train
    num_classes = int(dataset.num_classes)
    counts = [int(c) for c in train.class_counts]
    if len(counts) != num_classes:
        raise DataError(f"dataset {spec.name!r} reports {len(counts)} class counts for {num_classes} classes")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"dataset {spec.name!r}: classes {empty} have no training images")
    mode, workers = experiment.trainer.data_on_device, experiment.data.num_workers
    where = f"the {{}} split of dataset {spec.name!r}"
    val: Any = getattr(dataset, "val", None)
    return SeedData(
        context=context.replace(num_classes=num_classes, class_counts=tuple(counts), targets=train.targets),
        train=make_data(train, device, mode, workers, where.format("training")),
        test=make_data(dataset.test, device, mode, workers, where.format("test")),
        val=None if val is None else make_data(val, device, mode, workers, where.format("validation")),
    )
