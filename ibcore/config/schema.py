"""The experiment config (DESIGN.md §5) as pydantic models: the public contract of a YAML file.

Components are ``{name, params}``; a component's params are checked against its own params model
in a second pass (:mod:`ibcore.config.validation`), once the registry knows the name.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ibcore.registry import NumbersAreNotBooleans


class _Strict(NumbersAreNotBooleans):
    """Unknown keys are errors; numbers are finite and never booleans (``epochs: yes`` is not 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _object_or_null(schema: dict[str, Any]) -> None:
    """JSON Schema of ``params``: a mapping, or null (read as ``{}``), as the validator accepts."""
    schema["type"] = ["object", "null"]


class ComponentSpec(_Strict):
    """``{name, params}``: a registered component and its parameters.

    A subclass per kind sets ``component_kind``: that is how the JSON Schema and the config walk
    (:func:`ibcore.config.walk.component_specs`) know which kind a field holds.
    """

    component_kind: ClassVar[str | None] = None

    name: str = Field(min_length=1, description="Registered name, or 'provider:name' to pick a provider.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Checked against the component's params model; null is the same as {}.",
        json_schema_extra=_object_or_null,
    )

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


# One subclass per kind, so the JSON Schema can describe each kind's components separately.
class DatasetSpec(ComponentSpec):
    """A registered dataset."""

    component_kind = "dataset"


class SamplerSpec(ComponentSpec):
    """A registered sampler."""

    component_kind = "sampler"


class LossSpec(ComponentSpec):
    """A registered loss."""

    component_kind = "loss"


class BackboneSpec(ComponentSpec):
    """A registered backbone."""

    component_kind = "backbone"


class OptimizerSpec(ComponentSpec):
    """A registered optimizer with its learning-rate schedule."""

    component_kind = "optimizer"


class EvaluatorSpec(ComponentSpec):
    """A registered evaluator."""

    component_kind = "evaluator"


class StepSpec(ComponentSpec):
    """A registered training step (what one optimisation step does: standard, SAM, ...)."""

    component_kind = "step"


class AugmentationSpec(ComponentSpec):
    """A registered augmentation policy, applied after the dataset's own crop and flip."""

    component_kind = "augmentation"


class LoggerSpec(ComponentSpec):
    """A registered experiment tracker (tensorboard, mlflow, wandb)."""

    component_kind = "logger"


class MixerSpec(ComponentSpec):
    """A registered mixer."""

    component_kind = "mixer"


def _check_reference(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A published result: metric keys mapped to numbers, and a ``source`` saying where they come from."""
    if value is None:
        return None
    source = value.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("needs a 'source' saying where the published numbers come from (paper and table, or URL)")
    metrics = {k: v for k, v in value.items() if k != "source"}
    if not metrics:
        raise ValueError("names no metric; give the published value of a results column, e.g. acc1: 77.03")
    for key, number in metrics.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"{key!r} must be a finite number (the published value), got {number!r}")
    return {"source": source, **{k: float(v) for k, v in metrics.items()}}


_REFERENCE_HELP = (
    "Published result to show beside ours: metric keys of the results (e.g. acc1, few_acc) mapped to the "
    "published value, and 'source' (paper and table)."
)


class AdjustmentSpec(ComponentSpec):
    """A registered post-hoc adjustment."""

    component_kind = "adjustment"

    reference: dict[str, Any] | None = Field(None, description=_REFERENCE_HELP)

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_reference(value)


def spec_kinds() -> dict[type[ComponentSpec], str]:
    """Every spec class that names a kind (a plugin's too), and that kind."""
    found: dict[type[ComponentSpec], str] = {}
    pending: list[type[ComponentSpec]] = [ComponentSpec]
    while pending:
        cls = pending.pop()
        if cls.component_kind is not None and "component_kind" in vars(cls):
            found[cls] = cls.component_kind
        pending += cls.__subclasses__()
    return found


class DataConfig(_Strict):
    dataset: DatasetSpec
    batch_size: int = Field(
        128, ge=1, le=1 << 20, description="Training batch size; the global batch under torchrun data_parallel."
    )
    eval_batch_size: int | None = Field(None, ge=1, le=1 << 20, description="Defaults to 2 x batch_size.")
    num_workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        0,
        description="DataLoader workers (datasets not kept on the device); 'auto': one per CPU this process may use, "
        "at most 8 (CPUs shared among the processes torchrun starts on a node).",
    )
    drop_last: bool = Field(False, description="Drop the last incomplete training batch of each epoch.")


class DistributedConfig(_Strict):
    """How a ``torchrun`` launch splits the work (ignored in a single process); see docs/distributed.md."""

    mode: Literal["data_parallel", "runs_parallel"] = Field(
        "data_parallel",
        description="data_parallel: DDP, each rank takes a slice of every global batch; "
        "runs_parallel: rank r trains runs[r::world] on the full batch stream.",
    )
    sync_batchnorm: bool = Field(
        False, description="data_parallel: BatchNorm statistics over the global batch instead of each rank's slice."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto is nccl on CUDA, gloo on the CPU."
    )


def _switch_schema(*booleans: bool) -> Any:
    """JSON Schema of a switch written ``on``/``off``: YAML 1.1 reads those words as booleans, accepted too."""

    def extend(schema: dict[str, Any]) -> None:
        words = {key: schema.pop(key) for key in ("enum", "type", "const") if key in schema}
        schema["anyOf"] = [words, {"enum": list(booleans)}]

    return extend


def _on_off(value: Any) -> Any:
    """``fused: on`` reaches us as True (YAML 1.1 reads on/off, yes/no as booleans): True is "on", False "off"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class TrainerConfig(_Strict):
    epochs: int = Field(200, ge=1, le=100_000)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto picks CUDA when present.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 uses autocast on CUDA; ignored on CPU.")
    eval_every: int = Field(10, ge=1, description="Evaluate every N epochs and after the last one.")
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N epochs and after the last one.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="How many recent checkpoints to keep.")
    out_dir: str = Field("runs", min_length=1, description="Parent folder of the run directory.")
    fused: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Train runs of the same architecture as one stacked model where possible.",
        json_schema_extra=_switch_schema(True, False),
    )
    fused_max_runs: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Stack at most this many runs in one fused group (null: as many as fit in the device's free "
        "memory, estimated before the first step). A number that does not fit is refused before training, with "
        "the largest that does.",
    )
    data_on_device: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Keep small data sets on the device and augment there (no DataLoader).",
        json_schema_extra=_switch_schema(True, False),
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="On CUDA, capture the training step of fused groups (and of lone runs without a mixer) in a "
        "CUDA graph and replay it for every full batch.",
        json_schema_extra=_switch_schema(False),
    )
    compile: bool = Field(False, description="torch.compile the training step (CUDA).")
    channels_last: bool = Field(True, description="channels_last memory format for images and convolutions.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,  # type: ignore[arg-type]
        description="Multi-process training under torchrun.",
    )

    @field_validator("fused", "data_on_device", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return _on_off(value)

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _graphs_switch(cls, value: Any) -> Any:
        if value is True:
            raise PydanticCustomError(
                "cuda_graphs_on",
                'cuda_graphs is "auto" (graphs wherever CUDA allows them) or "off"; there is no "on": write "auto"',
            )
        return _on_off(value)


class StageConfig(_Strict):
    """From ``from_epoch`` on, replace parts of a run (DRW, DRS, fine-tuning without mixup, cRT, LWS)."""

    from_epoch: int = Field(
        ge=1, description="Epochs completed before the stage starts (160: from the 161st epoch on)."
    )
    loss: LossSpec | None = None
    sampler: SamplerSpec | None = None
    mixer: MixerSpec | None = Field(None, description="A new mixer, or null to switch mixing off.")
    optimizer: OptimizerSpec | None = Field(None, description="A fresh optimizer (and schedule) from this epoch.")
    step: StepSpec | None = Field(None, description="Another training step from this epoch (e.g. SAM).")
    retrain_classifier: bool = Field(
        False, description="cRT: freeze the backbone (BatchNorm in eval mode), re-initialise and train the classifier."
    )
    scale_classifier: bool = Field(
        False,
        description="LWS: freeze the backbone (BatchNorm in eval mode) and the classifier, and learn one scale per "
        "class that multiplies the logits (initialised to 1).",
    )
    train_classifier: bool = Field(
        False,
        description="Freeze the backbone and keep training the classifier as it is (not re-initialised); with "
        "scale_classifier, the classifier and the scales learn together (MiSLAS stage 2).",
    )
    batchnorm: Literal["frozen", "update"] | None = Field(
        None,
        description="In a stage that freezes the backbone: 'frozen' (default) keeps BatchNorm in eval mode; 'update' "
        "re-estimates its running statistics on the stage's batches while its weights stay frozen (MiSLAS's "
        "shift learning, BagofTricks-LT's cRT).",
    )


Seed = Annotated[int, Field(ge=0, lt=2**32)]


def _check_seeds(value: list[int] | None) -> list[int] | None:
    if value is not None:
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds must be unique; repeated: {', '.join(map(str, repeated))}")
    return value


_SEEDS_HELP = (
    "Repeat the run once per seed (runs named 'NAME@seedN'); the repeats train together and the tables show "
    "mean ± sample std over them."
)


class RunDefaults(_Strict):
    backbone: BackboneSpec | None = None
    loss: LossSpec | None = None
    optimizer: OptimizerSpec | None = None
    sampler: SamplerSpec | None = None
    mixer: MixerSpec | None = None
    step: StepSpec | None = None
    augmentation: AugmentationSpec | None = None


class RunConfig(_Strict):
    # A run expanded from a grid is named NAME[path=value,...] (ibcore.config.grid).
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_.\-=,+\[\]]+\])?$")
    grid: dict[str, list[Any]] | None = Field(
        None,
        exclude=True,
        description="One run per combination of these values, named NAME[gamma=1,...]: param paths of the run "
        "(loss.params.gamma, stages[0].from_epoch) mapped to lists of values. Expanded when the config is read.",
    )
    backbone: BackboneSpec | None = None
    loss: LossSpec | None = None
    optimizer: OptimizerSpec | None = None
    sampler: SamplerSpec | None = None
    mixer: MixerSpec | None = None
    step: StepSpec | None = Field(None, description="What one optimisation step does; default 'standard'.")
    augmentation: AugmentationSpec | None = Field(
        None, description="Augmentation policy after the dataset's own crop and flip; default 'standard' (none more)."
    )
    views: list[AugmentationSpec] = Field(
        default_factory=list,
        max_length=8,
        description="Extra augmented views of each training sample (contrastive methods), one policy each; a step "
        "reads them as batch.views.",
    )
    stages: list[StageConfig] = Field(default_factory=list)
    posthoc: list[AdjustmentSpec] = Field(
        default_factory=list, description="Post-hoc adjustments; the run is also evaluated with each applied."
    )
    seeds: list[Seed] | None = Field(
        None, min_length=1, max_length=1000, description=_SEEDS_HELP + " Overrides the top-level seeds."
    )
    reference: dict[str, Any] | None = Field(None, description=_REFERENCE_HELP)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        return _check_seeds(value)

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_reference(value)


def _default_evaluators() -> list[EvaluatorSpec]:
    return [EvaluatorSpec(name="accuracy"), EvaluatorSpec(name="shot_accuracy")]


class Experiment(_Strict):
    """A whole experiment: data, trainer settings and the runs trained together."""

    extends: str | list[str] | None = Field(
        None,
        exclude=True,
        description="Config file(s) this one builds on, relative to this file: deep-merged (mappings key by key; "
        "lists, including runs, and scalars replace), this file winning. Resolved when the file is read.",
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of every run (unless seeds is given).")
    seeds: list[Seed] | None = Field(None, min_length=1, max_length=1000, description=_SEEDS_HELP + " Replaces seed.")
    plugins: list[str] = Field(default_factory=list, description="Modules to import (trusted code).")
    data: DataConfig
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)  # type: ignore[arg-type]
    defaults: RunDefaults = Field(default_factory=RunDefaults)
    runs: list[RunConfig] = Field(min_length=1)
    evaluators: list[EvaluatorSpec] = Field(default_factory=_default_evaluators)
    loggers: list[LoggerSpec] = Field(
        default_factory=list,
        description="Experiment trackers each run is logged to (tensorboard, mlflow, wandb); metrics.jsonl stays "
        "the record.",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        return _check_seeds(value)

    def run(self, name: str) -> RunConfig:
        for run in self.runs:
            if run.name == name:
                return run
        raise KeyError(name)


def resolved_config(experiment: Experiment) -> dict[str, Any]:
    """The experiment as written to ``config.yaml`` (and printed by ``ib validate --print``): every default
    filled in, except inside stages.

    A stage changes only the fields it sets, and ``mixer: null`` there means "switch mixing off", so
    stages are written with exactly the fields they set (a filled-in null would switch mixing off
    after ``ib resume``).
    """
    resolved = experiment.model_dump(mode="json")
    for run, run_dump in zip(experiment.runs, resolved["runs"], strict=True):
        run_dump["stages"] = [stage.model_dump(mode="json", exclude_unset=True) for stage in run.stages]
    return resolved
