"""One small Protocol per component kind, checked once when a component is built.

Factories registered for a kind return an object that has these members; :func:`ibcore.kinds.check`
lists what is missing in one error instead of failing deep inside a training step. The kinds themselves
are declared in :mod:`ibcore.kinds`. Nothing here imports torch at run time, so validating a config
stays light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

    import numpy as np
    import torch
    from torch import Tensor

    from ibcore.context import BuildContext


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Per-sample augmentation of a tensor split, replayable in batch on the device.

    Random crop of the original size from the image zero-padded by ``pad`` pixels, a horizontal
    flip with probability 0.5 when ``flip``, then ``(x / 255 - mean) / std`` per channel.
    """

    pad: int = 0
    flip: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@runtime_checkable
class DataSplit(Protocol):
    """One split (train, val or test). ``targets`` and ``class_counts`` never touch images."""

    num_classes: int
    targets: Sequence[int]
    class_counts: Sequence[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


@runtime_checkable
class TensorSplit(DataSplit, Protocol):
    """A split small enough to live on the device: the engine replays ``augment`` itself."""

    augment: AugmentSpec

    def tensors(self) -> tuple[Tensor, Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,), un-augmented."""
        ...


@runtime_checkable
class Dataset(Protocol):
    """What a dataset factory returns: its splits (``val`` may be ``None``)."""

    num_classes: int
    train: DataSplit
    test: DataSplit
    val: DataSplit | None


@runtime_checkable
class Sampler(Protocol):
    """An index stream over the train split that is a pure function of (seed, epoch)."""

    def indices(self, epoch: int) -> np.ndarray:
        """int64 indices into the train split for ``epoch`` (the same every time it is asked)."""
        ...

    def __len__(self) -> int:
        """Number of indices per epoch."""
        ...


@runtime_checkable
class Loss(Protocol):
    """``loss(logits, targets, sample_weight=None) -> scalar``.

    ``sample_weight`` (N,) multiplies each sample's term without changing the normaliser, so a
    mixed batch's loss is ``loss(z, y_a, w) + loss(z, y_b, 1 - w)``.

    Optional: ``cuda_graph_safe = True`` declares the loss a pure function of its tensors, which lets
    the engine replay it from a CUDA graph (docs/registering.md).
    """

    def __call__(self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Backbone(Protocol):
    """A classifier network (a ``torch.nn.Module``) with access to features and hidden layers."""

    num_classes: int
    feature_dim: int
    num_mix_layers: int
    classifier: Any

    def __call__(self, x: Tensor) -> Tensor: ...

    def features(self, x: Tensor) -> Tensor:
        """Features before the classifier, (N, feature_dim)."""
        ...

    def forward_mixed(self, x: Tensor, layer: int, mix: Callable[[Tensor], Tensor]) -> Tensor:
        """Logits, with ``mix`` applied to the activations entering block ``layer`` (0 = input)."""
        ...

    def reset_classifier(self) -> None:
        """Re-initialise the classifier (classifier re-training)."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """An optimizer recipe: builds a torch optimizer and says the learning rate at any time."""

    base_lr: float

    def create(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer: ...

    def lr_at(self, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """The learning rate for a step: a pure function, so resuming needs no scheduler state."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    """torchmetrics-style metric: ``reset``, ``update`` per batch, ``compute`` at the end.

    ``compute`` returns ``{key: value}`` with plain identifier keys (``acc1``, ``few_acc``); percentages are in
    percent; non-scalar values (per-class lists, matrices) are allowed and left out of tables. Optional:
    ``labels`` (``{key: "acc@1 (%)"}``, what tables show) and ``headline`` (the key that picks the best epoch).
    """

    def reset(self) -> None: ...

    def update(self, logits: Tensor, targets: Tensor) -> None: ...

    def compute(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class MixPlan:
    """One draw of a mixer for one batch, shared by inputs (or activations) and targets.

    Sample ``i`` is mixed with ``permutation[i]``; ``lam`` weighs the sample itself in the input;
    ``target_weight[i]`` weighs its own label in the loss (the partner's label gets the rest);
    ``layer`` is where to mix (0 = inputs); ``box`` is CutMix's (y0, y1, x0, x1).
    """

    permutation: Tensor
    lam: float
    target_weight: Tensor
    layer: int = 0
    box: tuple[int, int, int, int] | None = None


@runtime_checkable
class Mixer(Protocol):
    """A batch-level mixer (mixup, CutMix, Remix, ...).

    Optional: ``standard_mix = True`` declares that ``mix(x, plan)`` is the standard mix of its plan: the
    partner's pixels pasted into ``plan.box`` when it is set, else ``lam * x + (1 - lam) * x[permutation]``.
    The fused step then mixes the runs' inputs with tensor operations of its own, which a CUDA graph can
    replay with a new plan at every step (the built-in mixers declare it).
    """

    def active(self, epoch: int) -> bool:
        """False in epochs where mixing is switched off (e.g. the last N epochs)."""
        ...

    def plan(self, x: Tensor, targets: Tensor, generator: torch.Generator) -> MixPlan: ...

    def mix(self, x: Tensor, plan: MixPlan) -> Tensor: ...


@runtime_checkable
class Augmentation(Protocol):
    """A per-sample augmentation policy, applied on the device to a training batch after the dataset's own
    augmentation (its crop and flip).

    ``draw`` makes every random choice for ``n`` samples from ``generator`` (CPU tensors whose first dimension
    is the sample); ``apply`` applies them to uint8 images (N, C, H, W) on any device and returns uint8 images.
    Optional: ``normalised = True`` (``apply`` takes the normalised float batch instead: Cutout's original
    placement, where a cut filled with 0 is the mean colour); ``parts`` (a sequence of policies applied in
    order: ``compose``); ``identity = True`` (the dataset's own augmentation only: ``standard``).
    """

    def draw(self, n: int, generator: torch.Generator) -> Mapping[str, Tensor]: ...

    def apply(self, images: Tensor, draws: Mapping[str, Tensor]) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class LogSession:
    """What an experiment tracker is told when training starts (or resumes).

    ``runs``: one entry per run of the tracker (every trained run, and every post-hoc variant such as
    ``ce+tau_norm``), each ``{"name", "method", "seed"}``. ``config`` is the resolved experiment; ``state`` is what
    this logger's :meth:`Logger.start` returned when the run directory was first trained (empty the first time),
    so a resumed training continues the same tracker runs.
    """

    run_dir: Path
    experiment: str
    runs: tuple[Mapping[str, Any], ...]
    config: Mapping[str, Any]
    config_hash: str
    resumed: bool
    state: Mapping[str, Any]
    epoch: int = 0  # epochs completed when training starts (a resume's checkpoint epoch)


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker (``loggers:``): every run of the experiment becomes a run in the tracker.

    Called from one background thread, in order: ``start`` once, ``log`` for every metrics line (an epoch's
    training loss and learning rate, or an evaluation's scalars, split-prefixed: ``test/acc1``), ``finish`` once
    with the final rows and the result files. An exception switches the logger off (reported once); training
    never waits for it. metrics.jsonl stays the record.
    """

    def start(self, session: LogSession) -> Mapping[str, Any] | None:
        """Open the tracker runs; return what a resume needs (tracker run ids), kept in the run directory."""
        ...

    def log(self, run: str, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, rows: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> None: ...


@runtime_checkable
class Adjustment(Protocol):
    """A post-hoc change of a trained model's logits at evaluation (tau-norm, logit adjustment)."""

    def __call__(self, model: Any, features: Tensor, logits: Tensor) -> Tensor: ...


class StepRun(Protocol):
    """What a training step sees of one run: a narrow view, rebuilt every epoch by the engine.

    ``loss``, ``optimizer`` and ``model`` are the run's current ones (a stage may have replaced them; a new
    optimizer object means a stage started);
    the learning rate of this step is already set. ``forward`` goes through the run's DDP wrapper under
    ``data_parallel`` (gradients are averaged over ranks); ``mix_plan`` draws the run's mixer plan for a
    batch from its seeded stream (None when the run does not mix in this epoch).
    """

    name: str
    model: torch.nn.Module
    loss: Loss
    optimizer: torch.optim.Optimizer
    mixer: Mixer | None
    context: BuildContext
    epoch: int  # the epoch being trained, counted from 0

    def forward(self, x: Tensor, layer: int = 0, mix: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Logits; with ``layer > 0``, ``mix`` is applied to the activations entering block ``layer``."""
        ...

    def mix_plan(self, x: Tensor, y: Tensor) -> MixPlan | None: ...

    def autocast(self) -> AbstractContextManager[Any]:
        """The precision context of forward passes (bf16 autocast on CUDA when the trainer asks for it)."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)  # tensors: compared by identity (shared batches are one object)
class Batch:
    """One training batch: inputs (N, C, H, W) and int64 targets (N,), augmented, on the device.

    ``views`` holds the run's extra views of the same samples (its ``views:`` policies, e.g. the second view of
    a contrastive method), each (N, C, H, W), in the order the config lists them.
    """

    inputs: Tensor
    targets: Tensor
    views: tuple[Tensor, ...] = ()


@runtime_checkable
class TrainingStep(Protocol):
    """What one optimisation step does to a set of runs (the ``step`` kind).

    ``runs`` train on ``batches[run.name]`` (runs of one seed and sampler share one :class:`Batch`
    object). The step computes each run's loss, updates its parameters with ``run.optimizer`` (whose
    learning rate is set), and returns each run's loss, detached, by name; the engine averages them
    per epoch and stops a run whose loss is not finite. Built-in: ``standard`` (forward, loss with the
    run's mixer, backward, one optimizer step) and the engine's fused step, which trains runs whose
    step is ``standard`` as one stacked model.

    Optional: ``fusable = True`` declares the step to be the standard step's arithmetic, so the fused
    path may stack its runs (only ``standard`` does; any other step trains its runs one by one).
    """

    def __call__(self, runs: Sequence[StepRun], batches: Mapping[str, Batch]) -> dict[str, Tensor]: ...


def is_tensor_split(split: Any) -> bool:
    """True if the engine can keep ``split`` on the device (it offers ``tensors()`` and ``augment``)."""
    return callable(getattr(split, "tensors", None)) and isinstance(getattr(split, "augment", None), AugmentSpec)
