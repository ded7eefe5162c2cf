"""ibcore: compare class-imbalance (long-tail) methods on equal footing, and add new ones as plugins.

The public API is importable from here. Importing ``ibcore`` does not import torch; the trainer
(``ibcore.run``) imports it when called.
"""

from __future__ import annotations

from typing import Any

from ibcore.build import build, validate_params
from ibcore.context import BuildContext
from ibcore.errors import (
    BuildError,
    CheckpointError,
    ConfigError,
    ConfigIssue,
    ContextError,
    DataError,
    IbError,
    PluginLoadError,
    ProtocolError,
    RegistryError,
    TrainingError,
)
from ibcore.kinds import Kind, declare_kind
from ibcore.protocols import Augmentation, AugmentSpec, Batch, Logger, LogSession, MixPlan, StepRun, TrainingStep
from ibcore.registry import (
    KINDS,
    ComponentInfo,
    DataPath,
    NoParams,
    Params,
    PerClass,
    list_components,
    register,
    register_adjustment,
    register_augmentation,
    register_backbone,
    register_dataset,
    register_evaluator,
    register_logger,
    register_loss,
    register_mixer,
    register_optimizer,
    register_sampler,
    register_step,
    registry_snapshot,
)

__version__ = "0.1.0"


def load_experiment(source: Any, *, overrides: list[str] | None = None) -> Any:
    """Load and fully validate an experiment from a YAML path (with its ``extends``) or a mapping; see
    :mod:`ibcore.config`."""
    from ibcore.config import load_experiment as _load

    return _load(source, overrides=overrides)


def validate(source: Any, *, overrides: list[str] | None = None) -> list[ConfigIssue]:
    """Every problem in an experiment config (empty when it is valid); never raises ConfigError."""
    from ibcore.config import validate as _validate

    return _validate(source, overrides=overrides)


def run(experiment: Any, **kwargs: Any) -> Any:
    """Train every run of ``experiment`` (an Experiment, a path or a mapping); returns Results."""
    from ibcore.engine import run as _run

    return _run(experiment, **kwargs)


__all__ = [
    "KINDS",
    "AugmentSpec",
    "Augmentation",
    "Batch",
    "BuildContext",
    "BuildError",
    "CheckpointError",
    "ComponentInfo",
    "ConfigError",
    "ConfigIssue",
    "ContextError",
    "DataError",
    "IbError",
    "Kind",
    "LogSession",
    "Logger",
    "MixPlan",
    "NoParams",
    "Params",
    "DataPath",
    "PerClass",
    "PluginLoadError",
    "ProtocolError",
    "RegistryError",
    "StepRun",
    "TrainingError",
    "TrainingStep",
    "__version__",
    "build",
    "declare_kind",
    "list_components",
    "load_experiment",
    "register",
    "register_adjustment",
    "register_augmentation",
    "register_backbone",
    "register_dataset",
    "register_evaluator",
    "register_logger",
    "register_loss",
    "register_mixer",
    "register_optimizer",
    "register_sampler",
    "register_step",
    "registry_snapshot",
    "run",
    "validate",
    "validate_params",
]
