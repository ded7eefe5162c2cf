"""Before the first batch: the device, the display, every component built once (preflight), and the ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.config.walk import component_specs
from ibcore.context import BuildContext
from ibcore.engine.batches import DeviceData, LoaderData, augment_batch
from ibcore.engine.distributed import Distributed, convert_batchnorm
from ibcore.engine.experiment_data import SeedData
from ibcore.engine.lanes import iters_per_epoch
from ibcore.engine.progress import ProgressDisplay
from ibcore.engine.runs import DEFAULT_SAMPLER, RunState, spec_key
from ibcore.errors import BuildError, ConfigError, ConfigIssue, ContextError, DataError, TrainingError

# Built by the engine itself (the dataset once, a backbone per run), not in preflight.
_NOT_PREFLIGHTED = ("dataset", "backbone")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"trainer.device is {name!r} but CUDA is not available on this machine; use 'auto'.")
    return device


class SilentDisplay(ProgressDisplay):
    """The display of a rank other than 0: nothing on the console and nothing in train.log."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(quiet=True, log_path=log_path)

    def log(self, message: str) -> None:
        pass

    def print(self, renderable: Any) -> None:
        pass


def preflight(
    experiment: Experiment,
    context: BuildContext,
    runs: list[RunState],
    data: dict[int, SeedData],
    device: torch.device,
    source: str,
) -> None:
    """Build every component a run will use, at every stage, before the first batch.

    Some mistakes are only visible with the data at hand (a class-weight list of the wrong length,
    ``disable_last_epochs`` longer than the run): they are reported now, with their config path,
    instead of after hours of training. The components are found by the same walk as ``ib validate``'s.
    """
    context = context.replace(iters_per_epoch=1)
    specs = [
        (path, kind, spec)
        for spec, kind, path in component_specs(Experiment, experiment)
        if kind not in _NOT_PREFLIGHTED and not path.startswith("defaults.")
    ]
    for i, run in enumerate(experiment.runs):
        if run.sampler is None:  # the default sampler can leave no full batch too
            specs.append((f"runs[{i}].sampler (default)", "sampler", DEFAULT_SAMPLER))
    issues = []
    data_config = experiment.data
    for path, kind, spec in specs:
        try:
            built = build(kind, spec.name, spec.params, context=context)
        except ConfigError as exc:
            issues += [ConfigIssue(f"{path}.{issue.path}", issue.message) for issue in exc.issues]
            continue
        except (ContextError, DataError, BuildError) as exc:
            issues.append(ConfigIssue(path, str(exc)))
            continue
        if kind == "sampler" and iters_per_epoch(len(built), data_config.batch_size, data_config.drop_last) == 0:
            message = (
                f"{data_config.batch_size} is more than the {len(built)} images sampler {spec.name!r} ({path}) draws "
                "per epoch, and data.drop_last drops the incomplete batch: that run would take no optimisation "
                "step. Lower data.batch_size or set data.drop_last: false"
            )
            issues.append(ConfigIssue("data.batch_size", message))
    issues += _input_shape_issues(experiment, runs, data, device)
    if not all(isinstance(seed_data.train, DeviceData) for seed_data in data.values()):
        for i, run in enumerate(experiment.runs):
            asked = [] if run.augmentation is None or run.augmentation.name == "standard" else ["augmentation"]
            for field in asked + (["views"] if run.views else []):
                issues.append(
                    ConfigIssue(
                        f"runs[{i}].{field}",
                        "augmentation policies and views are applied on the device: they need a dataset held as "
                        f"tensors (CIFAR, MNIST, array_file), not {experiment.data.dataset.name!r} read through a "
                        "DataLoader (or trainer.data_on_device is 'off')",
                    )
                )
    if issues:
        raise ConfigError(issues, source=source)


def _input_shape_issues(
    experiment: Experiment, runs: list[RunState], data: dict[int, SeedData], device: torch.device
) -> list[ConfigIssue]:
    """One forward pass of one training image through each distinct backbone, before the first batch: RGB
    images into a one-channel network, or an image size a model cannot take, are reported at the
    backbone's config path instead of as a traceback from deep inside torch."""
    issues = []
    seen: set[str] = set()
    for i, run in enumerate(experiment.runs):
        assert run.backbone is not None
        key = spec_key(run.backbone)
        if key in seen:
            continue
        seen.add(key)
        state = next(r for r in runs if r.method == run.name)
        x = one_image(data[state.seed].train).to(device)
        was_training = state.model.training
        state.model.eval()  # no BatchNorm statistics change
        try:
            with torch.no_grad():
                state.model(x)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            issues.append(
                ConfigIssue(
                    f"runs[{i}].backbone",
                    f"backbone {run.backbone.name!r} cannot take the images of dataset "
                    f"{experiment.data.dataset.name!r} (one image is {tuple(x.shape[1:])}, channels first): "
                    f"{reason}. Check the backbone's params (in_channels, image size)",
                )
            )
        finally:
            state.model.train(was_training)
    return issues


def prepare_ranks(
    dist: Distributed, runs: list[RunState], display: ProgressDisplay, device: torch.device, batch_size: int
) -> None:
    """SyncBatchNorm where asked; identical initial weights on every rank (checked, then rank 0's copied)."""
    display.log(
        f"distributed: {dist.world_size} processes, {dist.mode}, backend {dist.backend}, device {device}"
        + (f"; global batch {batch_size} = {dist.local_batch(batch_size)} per process" if dist.splits_batches else "")
    )
    if dist.sync_batchnorm:
        if dist.splits_batches:
            for run in runs:
                run.model = convert_batchnorm(run.model, device)
            display.log("BatchNorm statistics computed over the global batch (sync_batchnorm)")
        else:
            display.log("trainer.distributed.sync_batchnorm has no effect under runs_parallel")
    if dist.splits_runs:
        for rank in range(dist.world_size):
            names = [run.name for run in runs[rank :: dist.world_size]]
            display.log(f"rank {rank} trains: {', '.join(names) if names else 'nothing (more ranks than runs)'}")
    differing = [run.name for run in runs if dist.broadcast_module(run.model)]
    if differing:
        display.log(
            f"[yellow]initial weights of {', '.join(differing)} differed between ranks (a backbone that draws "
            "from an unseeded source); every rank now uses rank 0's[/yellow]"
        )


def one_image(data: DeviceData | LoaderData) -> torch.Tensor:
    """The first training image as a batch of one, normalised as the evaluation sees it."""
    if isinstance(data, DeviceData):
        return augment_batch(data.images[:1], data.augment, None, False)
    image, _ = data.split[0]
    return torch.as_tensor(image).unsqueeze(0).to(torch.get_default_dtype())


def log_data(display: ProgressDisplay, data: dict[int, SeedData]) -> None:
    """One log line on the data: size, where it lives, draws per seed, classes and counts."""
    first = next(iter(data.values()))
    where = "on the device, augmented there" if isinstance(first.train, DeviceData) else "via a DataLoader"
    draws = len({id(seed_data) for seed_data in data.values()})
    display.log(
        f"data: {len(first.train)} training images {where}"
        + (f" (a subset drawn per seed: {draws} draws)" if draws > 1 else "")
        + f"; {first.num_classes} classes; class counts {first.class_counts}"
    )


def epochs_to_train(experiment: Experiment, smoke: int | None, start: int, display: ProgressDisplay) -> list[int]:
    """The epochs left from ``start``: all of them, or a smoke run's (said in the log)."""
    if smoke is None:
        return list(range(start, experiment.trainer.epochs))
    epochs = [epoch for epoch in smoke_epochs(experiment) if epoch >= start]
    display.log(
        f"[yellow]smoke run: epochs {', '.join(str(e + 1) for e in epochs)} of {experiment.trainer.epochs} (the "
        f"first, each stage's first, the last), {smoke} batches each, one evaluation on {smoke} batches; its "
        "numbers mean nothing[/yellow]"
    )
    return epochs


def smoke_epochs(experiment: Experiment) -> list[int]:
    """The epochs a smoke run trains: the first, the first of every stage, and the last. Schedules, stages and
    samplers see their true epoch numbers, so every phase of every run is exercised."""
    starts = {stage.from_epoch for run in experiment.runs for stage in run.stages}
    return sorted({0, experiment.trainer.epochs - 1} | {e for e in starts if e < experiment.trainer.epochs})


def config_source(run_dir: Path) -> str:
    """The config file a run came from (for error messages), else the run's own config.yaml."""
    try:
        origin = json.loads((run_dir / "origin.json").read_text(encoding="utf-8"))
        if (
            isinstance(origin, dict)
            and isinstance(origin.get("config"), str)
            and origin["config"].endswith((".yaml", ".yml", ".json"))
        ):
            return origin["config"]
    except (OSError, ValueError):
        pass
    return str(run_dir / "config.yaml")
