"""Seeds as an axis of runs: every run of a config, once per seed.

``seeds: [0, 1, 2]`` (top level, or on a run) turns the run ``ce`` into the runs ``ce@seed0``,
``ce@seed1`` and ``ce@seed2``. They are ordinary runs that train together with the others; each
draws everything random (initial weights, sampler, augmentation, mixer, the dataset's subset when it
takes one) from its own seed and its method's name, never from the repeat's name or position, so
``ce@seed1`` is the run ``ce`` of a separate experiment with ``seed: 1``.
"""

from __future__ import annotations

import dataclasses

from ibcore.config.schema import Experiment, RunConfig

SEED_SEPARATOR = "@seed"


@dataclasses.dataclass(frozen=True)
class Repeat:
    """One trained run: a run of the config (its ``method``) at one seed."""

    config: RunConfig
    seed: int
    name: str  # "ce", or "ce@seed1" when the run is repeated over seeds

    @property
    def method(self) -> str:
        return self.config.name

    @property
    def suffix(self) -> str:
        return self.name[len(self.method) :]

    def variant(self, adjustment: str | None) -> str:
        """The name of this run's row, raw or with a post-hoc adjustment (``ce+tau_norm@seed1``)."""
        return self.name if adjustment is None else f"{self.method}+{adjustment}{self.suffix}"


def seeds_of(experiment: Experiment, run: RunConfig) -> list[int] | None:
    """The seeds ``run`` is repeated over, or None when it runs once with ``experiment.seed``."""
    return run.seeds if run.seeds is not None else experiment.seeds


def expand_runs(experiment: Experiment) -> list[Repeat]:
    """Every run once per seed, grouped by run (``ce@seed0, ce@seed1, ldam@seed0, ...``)."""
    repeats = []
    for run in experiment.runs:
        seeds = seeds_of(experiment, run)
        if seeds is None:
            repeats.append(Repeat(run, experiment.seed, run.name))
        else:
            repeats += [Repeat(run, seed, f"{run.name}{SEED_SEPARATOR}{seed}") for seed in seeds]
    return repeats


def all_seeds(experiment: Experiment) -> list[int]:
    """The distinct seeds of an experiment's runs, in order of first use."""
    seeds: list[int] = []
    for repeat in expand_runs(experiment):
        if repeat.seed not in seeds:
            seeds.append(repeat.seed)
    return seeds
