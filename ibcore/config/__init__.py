"""The experiment config: schema, safe YAML loading, overrides, validation and JSON-Schema export."""

from ibcore.config.jsonschema import experiment_json_schema
from ibcore.config.loading import compose_config_file, read_config_file
from ibcore.config.schema import (
    ComponentSpec,
    DataConfig,
    Experiment,
    RunConfig,
    RunDefaults,
    StageConfig,
    TrainerConfig,
    resolved_config,
)
from ibcore.config.validation import load_experiment, validate

__all__ = [
    "ComponentSpec",
    "DataConfig",
    "Experiment",
    "RunConfig",
    "RunDefaults",
    "StageConfig",
    "TrainerConfig",
    "compose_config_file",
    "experiment_json_schema",
    "load_experiment",
    "read_config_file",
    "resolved_config",
    "validate",
]
