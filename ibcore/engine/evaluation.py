"""Evaluation: every run's metrics on the test (and validation) split, raw and with its post-hoc adjustments."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.engine.batches import DeviceData, LoaderData
from ibcore.engine.distributed import Distributed, eval_counts, eval_indices
from ibcore.engine.experiment_data import SeedData
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.records import Records
from ibcore.engine.runs import RunState
from ibcore.protocols import Adjustment, Evaluator
from ibcore.report.labels import display_label, evaluator_labels, headline_key
from ibcore.report.tables import lower_is_better

Variants = dict[str, tuple[Adjustment | None, list[Evaluator]]]


class Evaluation:
    """Builds a run's evaluators and measures it; ``labels`` and ``headline`` come from the evaluators."""

    def __init__(
        self,
        experiment: Experiment,
        run: RunState,
        *,
        dist: Distributed,
        device: torch.device,
        bf16: bool,
        smoke: int | None,
        num_classes: int,
    ) -> None:
        self.experiment = experiment
        self.num_classes = num_classes
        self.dist = dist
        self.device = device
        self.bf16 = bf16
        self.smoke = smoke
        evaluators = self.evaluators(run)
        self.labels = evaluator_labels(evaluators)  # metric key -> the column header of the tables
        self.headline = headline_key(evaluators)  # selects the best epoch on validation; sums up the log

    def evaluators(self, run: RunState) -> list[Evaluator]:
        return [build("evaluator", e.name, e.params, context=run.context) for e in self.experiment.evaluators]

    def headline_of(self, metrics: dict[str, Any]) -> tuple[str | None, float | None]:
        """The headline metric of an evaluation: the first evaluator's that declares one (``acc1`` for accuracy,
        ``balanced_acc`` for balanced_accuracy), else the first scalar metric where higher is better."""
        candidates = [self.headline] if self.headline else []
        candidates += [key for key in metrics if not lower_is_better(key)]
        for key in candidates:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return key, float(value)
        return None, None

    def measure_runs(
        self, runs: list[RunState], data: dict[int, SeedData]
    ) -> dict[str, list[tuple[str, str, dict[str, Any]]]]:
        """Per run: ``(split, variant, metrics)`` on its seed's test split, and validation split if any. The runs
        of one seed read each split once together (a split read from image files is decoded once, not per run)."""
        results: dict[str, list[tuple[str, str, dict[str, Any]]]] = {run.name: [] for run in runs}
        for seed in dict.fromkeys(run.seed for run in runs):
            together = [run for run in runs if run.seed == seed]
            splits = data[seed]
            for split, name in ((splits.test, "test"), (splits.val, "val")):
                if split is None:
                    continue
                for run, variants in zip(together, self.measure_together(together, split), strict=True):
                    results[run.name] += [(name, v, m) for v, m in variants.items()]
        return results

    def record(
        self,
        runs: list[RunState],
        results: dict[str, list[tuple[str, str, dict[str, Any]]]],
        completed: int,
        records: Records,
        display: ProgressDisplay,
    ) -> None:
        """Append the evaluation of ``runs`` after ``completed`` epochs to the records; log the headline metric."""
        summary, keys = [], set()
        for run in runs:
            for split, variant, metrics in results[run.name]:
                score = self.headline_of(metrics)[1] if split == "val" else None
                records.evaluation(split, variant, completed, metrics, score)
            key, headline = self.headline_of(records.last("test", run.name, completed))
            if key is not None and headline is not None:
                summary.append(f"{run.name}={headline:.2f}")
                keys.add(key)
        if summary:
            what = display_label(keys.pop(), self.labels) if len(keys) == 1 else "headline metric"
            display.log(f"epoch {completed}: test {escape(what)} " + " ".join(summary))

    @torch.no_grad()
    def measure_together(self, runs: list[RunState], data: DeviceData | LoaderData) -> list[dict[str, dict[str, Any]]]:
        """Per run of ``runs`` (in order), its metrics on ``data``: raw, and with each post-hoc adjustment. Each
        batch of ``data`` is read once and goes through every run's model.

        Under data_parallel each rank computes the logits of its own contiguous block of ``data``;
        the blocks are gathered in order, so every rank's evaluators see the whole split once, in the
        same batches as a single process.
        """
        all_variants = [self._variants(run) for run in runs]
        for run in runs:
            run.model.eval()
        batch_size = self.experiment.data.batch_size
        eval_batch = self.experiment.data.eval_batch_size or 2 * batch_size
        if not self.dist.splits_batches:
            order = np.arange(len(data) if self.smoke is None else min(len(data), self.smoke * eval_batch))
            for x, y in data.iterate(order, eval_batch, None, False, False):
                for run, variants in zip(runs, all_variants, strict=True):
                    outputs = self._outputs(run.model, variants, x)
                    for name, (_, evaluators) in variants.items():
                        for evaluator in evaluators:
                            evaluator.update(outputs[name], y)
        else:
            for run, variants in zip(runs, all_variants, strict=True):
                self._measure_sharded(run.model, variants, data, eval_batch)
        measured = []
        for variants in all_variants:
            results = {}
            for name, (_, evaluators) in variants.items():
                merged: dict[str, Any] = {}
                for evaluator in evaluators:
                    merged.update(evaluator.compute())
                results[name] = merged
            measured.append(results)
        return measured

    def _variants(self, run: RunState) -> Variants:
        """The run's raw evaluators and those of each of its post-hoc adjustments."""
        variants: Variants = {run.name: (None, self.evaluators(run))}
        for spec in run.config.posthoc:
            adjustment = build("adjustment", spec.name, spec.params, context=run.context)
            variants[run.repeat.variant(spec.name)] = (adjustment, self.evaluators(run))
        return variants

    def _measure_sharded(
        self, model: nn.Module, variants: Variants, data: DeviceData | LoaderData, eval_batch: int
    ) -> None:
        world = self.dist.world_size
        counts = eval_counts(len(data), world)
        order = eval_indices(len(data), self.dist.rank, world)
        collected: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
        labels: list[torch.Tensor] = []
        for outputs, y in self._variant_logits(model, variants, data, order, math.ceil(eval_batch / world)):
            for name in variants:
                collected[name].append(outputs[name])
            labels.append(y.to(torch.long))
        empty_labels = torch.empty(0, dtype=torch.long, device=self.device)
        targets = self.dist.all_gather_rows(torch.cat(labels) if labels else empty_labels, counts)
        for name, (_, evaluators) in variants.items():
            empty = torch.empty(0, self.num_classes, device=self.device)
            logits = self.dist.all_gather_rows(torch.cat(collected[name]) if collected[name] else empty, counts)
            for start in range(0, len(targets), eval_batch):
                for evaluator in evaluators:
                    evaluator.update(logits[start : start + eval_batch], targets[start : start + eval_batch])

    def _variant_logits(
        self, model: nn.Module, variants: Variants, data: DeviceData | LoaderData, order: np.ndarray, batch_size: int
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Per batch of ``order``: the logits of every variant (raw or post-hoc adjusted) and the targets."""
        for x, y in data.iterate(order, batch_size, None, False, False):
            yield self._outputs(model, variants, x), y

    def _outputs(self, model: nn.Module, variants: Variants, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of every variant (raw or post-hoc adjusted) of ``model`` on ``x``."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features = model.features(x)  # type: ignore[operator]
            logits = model.classifier(features)  # type: ignore[operator]
        features, logits = features.float(), logits.float()
        return {
            name: logits if adjustment is None else adjustment(model, features, logits)
            for name, (adjustment, _) in variants.items()
        }
