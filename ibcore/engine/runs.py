"""One run's live components, and the stage logic that changes them at given epochs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from ibcore.build import build
from ibcore.config.schema import ComponentSpec, RunConfig
from ibcore.context import BuildContext
from ibcore.engine.repeats import Repeat
from ibcore.engine.seeding import derive_seed
from ibcore.protocols import Loss, Mixer, TrainingStep
from ibcore.protocols import Optimizer as OptimizerRecipe

DEFAULT_SAMPLER = ComponentSpec(name="instance")
DEFAULT_STEP = ComponentSpec(name="standard")


def spec_key(spec: ComponentSpec | None) -> str:
    """A canonical string for a component spec (runs with equal keys can share a batch or weights)."""
    if spec is None:
        return "null"
    return json.dumps({"name": spec.name, "params": spec.params}, sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True)
class EffectiveSpecs:
    """What a run uses in a given epoch, after applying every stage that has started."""

    loss: ComponentSpec
    sampler: ComponentSpec
    mixer: ComponentSpec | None
    optimizer: ComponentSpec
    optimizer_from_epoch: int  # the epoch the current optimizer (and its schedule) started at
    retrain_classifier: bool
    stage_index: int  # -1 before any stage
    scale_classifier: bool = False  # LWS
    train_classifier: bool = False  # the backbone frozen, the classifier trained on (with LWS: MiSLAS)
    update_batchnorm: bool = False  # a frozen backbone's BatchNorm re-estimates its running statistics
    step: ComponentSpec = dataclasses.field(default_factory=lambda: DEFAULT_STEP)

    @property
    def backbone_frozen(self) -> bool:
        return self.retrain_classifier or self.scale_classifier or self.train_classifier


def effective_specs(run: RunConfig, epoch: int) -> EffectiveSpecs:
    """The components of ``run`` in ``epoch``: later stages override only the fields they set."""
    assert run.loss is not None and run.optimizer is not None
    loss, sampler, mixer, optimizer = run.loss, run.sampler or DEFAULT_SAMPLER, run.mixer, run.optimizer
    step: ComponentSpec = run.step or DEFAULT_STEP
    optimizer_from, retrain, scale, train, batchnorm, index = 0, False, False, False, "frozen", -1
    for i, stage in enumerate(run.stages):
        if stage.from_epoch > epoch:
            break
        index = i
        fields = stage.model_fields_set
        if stage.loss is not None:
            loss = stage.loss
        if stage.sampler is not None:
            sampler = stage.sampler
        if "mixer" in fields:
            mixer = stage.mixer
        if stage.optimizer is not None:
            optimizer, optimizer_from = stage.optimizer, stage.from_epoch
        if stage.step is not None:
            step = stage.step
        if stage.retrain_classifier:
            retrain = True
        if stage.scale_classifier:
            scale = True
        if stage.train_classifier:
            train = True
        if stage.batchnorm is not None:
            batchnorm = stage.batchnorm
    return EffectiveSpecs(
        loss, sampler, mixer, optimizer, optimizer_from, retrain, index, scale, train, batchnorm == "update", step
    )


def _scale_logits(classifier: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
    # The attribute, not get_parameter(): a fused group's functional_call swaps in a plain (stacked) tensor.
    return logits * classifier.class_scale  # type: ignore[operator]


def add_class_scale(model: torch.nn.Module) -> None:
    """LWS (Kang et al. 2020): a learnable scale per class, initialised to 1, multiplying the classifier's
    logits (bias included, as the official code and MiSLAS do). Stored on the classifier as ``class_scale``,
    so it is in the state dict (``classifier.class_scale``) and every forward pass (training, evaluation,
    post-hoc adjustments) sees it. Does nothing if the model has it already."""
    classifier: torch.nn.Module = model.classifier  # type: ignore[assignment]
    if "class_scale" in classifier._parameters:
        return
    reference = next(classifier.parameters())
    scale = torch.ones(int(model.num_classes), device=reference.device, dtype=reference.dtype)  # type: ignore[arg-type]
    classifier.register_parameter("class_scale", torch.nn.Parameter(scale))
    classifier.register_forward_hook(_scale_logits)


class RunState:
    """A run's model, loss, optimizer, mixer and evaluators, rebuilt when a stage starts."""

    def __init__(self, repeat: Repeat, context: BuildContext, device: torch.device) -> None:
        config = repeat.config
        self.repeat = repeat
        self.config = config
        self.name = repeat.name  # "ce", or "ce@seed1" for a repeat
        self.method = repeat.method  # "ce": what its random draws are named by, so a repeat equals a lone run
        self.context = context  # its seed's data, and context.seed == seed
        self.seed = repeat.seed
        self.device = device
        assert config.backbone is not None
        # Runs with the same backbone spec start from identical weights, whatever their order.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "init", spec_key(config.backbone)))
            self.model: torch.nn.Module = build(
                "backbone", config.backbone.name, config.backbone.params, context=context
            )
        self.model.to(device)
        self.failed: str | None = None
        self.specs: EffectiveSpecs | None = None
        self.loss: Loss | None = None
        self.mixer: Mixer | None = None
        self.step: TrainingStep | None = None
        self.recipe: OptimizerRecipe | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss_sum = torch.zeros((), device=device)
        self.loss_steps = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    # -- stages -------------------------------------------------------------------------------

    def configure(self, epoch: int, epochs: int, iters_per_epoch: int, transition: bool) -> bool:
        """Build the components for ``epoch``. With ``transition``, also perform a starting stage's
        one-off actions (re-initialise the classifier, fresh optimizer state). Returns True if anything
        was rebuilt."""
        specs = effective_specs(self.config, epoch)
        previous = self.specs
        if previous is not None and specs == previous:
            return False
        context = self.context.replace(iters_per_epoch=iters_per_epoch)
        if previous is None or spec_key(specs.loss) != spec_key(previous.loss):
            self.loss = build("loss", specs.loss.name, specs.loss.params, context=context)
            if isinstance(self.loss, torch.nn.Module):
                self.loss.to(self.device)
        if previous is None or spec_key(specs.step) != spec_key(previous.step):
            self.step = build("step", specs.step.name, specs.step.params, context=context)
        if previous is None or spec_key(specs.mixer) != spec_key(previous.mixer):
            self.mixer = (
                None if specs.mixer is None else build("mixer", specs.mixer.name, specs.mixer.params, context=context)
            )
        starts_retrain = specs.retrain_classifier and (previous is None or not previous.retrain_classifier)
        if starts_retrain and transition:
            self._reset_classifier(epoch)
        starts_scaling = specs.scale_classifier and (previous is None or not previous.scale_classifier)
        starts_training = specs.train_classifier and (previous is None or not previous.train_classifier)
        if specs.scale_classifier:
            # Also when resuming (transition=False): the checkpoint holds the scale, so it must exist first.
            add_class_scale(self.model)
        self._freeze(specs)
        new_optimizer = (
            previous is None
            or spec_key(specs.optimizer) != spec_key(previous.optimizer)
            or specs.optimizer_from_epoch != previous.optimizer_from_epoch
            or starts_retrain
            or starts_scaling
            or starts_training
        )
        if new_optimizer:
            horizon = context.replace(epochs=epochs - specs.optimizer_from_epoch)
            self.recipe = build("optimizer", specs.optimizer.name, specs.optimizer.params, context=horizon)
            trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.optimizer = self.recipe.create(trainable)
        self.specs = specs
        return True

    def _reset_classifier(self, epoch: int) -> None:
        """cRT's new classifier, drawn from (seed, run, epoch) rather than from wherever the global random
        stream stands: the same in one process or under torchrun, whatever ran before."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.seed, "reset_classifier", self.method, epoch))
            self.model.reset_classifier()  # type: ignore[operator]

    def _freeze(self, specs: EffectiveSpecs) -> None:
        """cRT trains the classifier only, LWS the per-class scale only (MiSLAS both); otherwise everything trains."""
        classifier: torch.nn.Module = self.model.classifier  # type: ignore[assignment]
        if specs.scale_classifier and not specs.train_classifier:
            trainable = {id(classifier.get_parameter("class_scale"))}
        elif specs.backbone_frozen:
            trainable = {id(p) for p in classifier.parameters()}  # with LWS, class_scale is one of them
        else:
            trainable = {id(p) for p in self.model.parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    def train_mode(self) -> None:
        """Train mode; while the backbone is frozen (cRT, LWS) its BatchNorm statistics stay frozen too, unless
        the stage re-estimates them (``batchnorm: update``: train mode, but no parameter of the backbone learns)."""
        assert self.specs is not None
        if self.specs.backbone_frozen and not self.specs.update_batchnorm:
            self.model.eval()
            self.model.classifier.train()  # type: ignore[union-attr]
        else:
            self.model.train()

    def set_lr(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        assert self.specs is not None and self.optimizer is not None and self.recipe is not None
        lr = self.recipe.lr_at(epoch - self.specs.optimizer_from_epoch, iteration, iters_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def mixer_generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(derive_seed(self.seed, "mixer", self.method, epoch))
        return generator

    # -- bookkeeping ----------------------------------------------------------------------------

    def record_loss(self, loss: torch.Tensor, step: int) -> None:
        """Accumulate on the device; remember the first non-finite step (no host sync here)."""
        value = loss.detach().to(self.loss_sum.dtype)
        finite = torch.isfinite(value)
        self.loss_sum += torch.where(finite, value, torch.zeros_like(value))
        self.loss_steps += 1
        bad = (~finite) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def end_epoch(self) -> tuple[float, int]:
        """Mean training loss of the epoch and the first non-finite step (-1 if none); resets both."""
        mean = float(self.loss_sum.item()) / max(self.loss_steps, 1)
        bad = int(self.first_bad_step.item())
        self.loss_sum.zero_()
        self.loss_steps = 0
        self.first_bad_step.fill_(-1)
        return mean, bad
