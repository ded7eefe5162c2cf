"""Built-in augmentation policies (registered on import; torch is imported by the factories).

A policy adds to the dataset's own augmentation (CIFAR's pad-4 crop and flip): ``standard`` adds nothing
(today's behaviour, the default), ``autoaugment``, ``randaugment``, ``trivialaugment`` and ``color_jitter``
change pixels, ``cutout`` cuts a square out of the normalised batch (as the original Cutout code does), and
``compose`` chains several. Each sample draws its own operations and magnitudes, on the device, from the
run's seeded stream; the operations are torchvision's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator

from ibcore import BuildContext, ConfigError, ConfigIssue, NoParams, Params, build, register_augmentation

if TYPE_CHECKING:
    from ibcore.protocols import Augmentation


class _Standard:
    """The dataset's own augmentation only."""

    identity = True

    def draw(self, n: int, generator: Any) -> dict[str, Any]:
        return {}

    def apply(self, images: Any, draws: Any) -> Any:
        return images


@register_augmentation("standard", NoParams)
def build_standard(params: NoParams, context: BuildContext) -> _Standard:
    """The dataset's own augmentation (CIFAR/MNIST: pad-4 random crop and flip), nothing more; the default."""
    return _Standard()


Fill = Annotated[int, Field(ge=0, le=255, description="pixel value (0-255) of areas a geometric op uncovers")]


class AutoAugmentParams(Params):
    policy: Literal["cifar10", "imagenet", "svhn"] = Field("cifar10", description="torchvision's learned policy")
    fill: Fill = 0


@register_augmentation(
    "autoaugment",
    AutoAugmentParams,
    citation="Cubuk et al., CVPR 2019, 'AutoAugment: Learning Augmentation Strategies from Data'",
)
def build_autoaugment(params: AutoAugmentParams, context: BuildContext) -> Augmentation:
    """AutoAugment (torchvision's CIFAR10/ImageNet/SVHN policies), one sub-policy drawn per sample."""
    from ib_plugins_builtin.augmentations._policies import AutoAugment

    return AutoAugment(policy=params.policy, fill=params.fill)  # type: ignore[no-any-return]


class RandAugmentParams(Params):
    num_ops: int = Field(2, ge=1, le=10, description="operations per sample")
    magnitude: int = Field(9, ge=0, description="magnitude bin (0 .. num_magnitude_bins - 1)")
    num_magnitude_bins: int = Field(31, ge=2, le=1000)
    fill: Fill = 0

    @field_validator("magnitude")
    @classmethod
    def _in_range(cls, value: int, info: Any) -> int:
        bins = info.data.get("num_magnitude_bins", 31) if info.data else 31
        if value >= bins:
            raise ValueError(f"must be below num_magnitude_bins ({bins})")
        return value


@register_augmentation(
    "randaugment",
    RandAugmentParams,
    citation="Cubuk et al., NeurIPS 2020, 'RandAugment: Practical automated data augmentation with a reduced search "
    "space'",
)
def build_randaugment(params: RandAugmentParams, context: BuildContext) -> Augmentation:
    """RandAugment (torchvision's operations): num_ops operations drawn per sample at one magnitude."""
    from ib_plugins_builtin.augmentations._policies import RandAugment

    return RandAugment(  # type: ignore[no-any-return]
        num_ops=params.num_ops,
        magnitude=params.magnitude,
        num_magnitude_bins=params.num_magnitude_bins,
        fill=params.fill,
    )


class TrivialAugmentParams(Params):
    num_magnitude_bins: int = Field(31, ge=2, le=1000)
    fill: Fill = 0


@register_augmentation(
    "trivialaugment",
    TrivialAugmentParams,
    citation="Müller and Hutter, ICCV 2021, 'TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation'",
)
def build_trivialaugment(params: TrivialAugmentParams, context: BuildContext) -> Augmentation:
    """TrivialAugment Wide: one operation and one magnitude drawn per sample."""
    from ib_plugins_builtin.augmentations._policies import TrivialAugmentWide

    return TrivialAugmentWide(num_magnitude_bins=params.num_magnitude_bins, fill=params.fill)  # type: ignore[no-any-return]


class ColorJitterParams(Params):
    brightness: float = Field(0.4, ge=0.0, description="factor drawn from [max(0, 1 - b), 1 + b]")
    contrast: float = Field(0.4, ge=0.0, description="factor drawn from [max(0, 1 - c), 1 + c]")
    saturation: float = Field(0.4, ge=0.0, description="factor drawn from [max(0, 1 - s), 1 + s]")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="shift drawn from [-h, h]")


@register_augmentation("color_jitter", ColorJitterParams)
def build_color_jitter(params: ColorJitterParams, context: BuildContext) -> Augmentation:
    """torchvision's ColorJitter with per-sample factors and order (SimCLR-style colour distortion)."""
    from ib_plugins_builtin.augmentations._policies import ColorJitter

    return ColorJitter(  # type: ignore[no-any-return]
        brightness=params.brightness, contrast=params.contrast, saturation=params.saturation, hue=params.hue
    )


class CutoutParams(Params):
    length: int = Field(16, ge=1, description="side of the square cut, in pixels (16 for CIFAR-10 in the paper)")
    n_holes: int = Field(1, ge=1, le=64)
    before_normalisation: bool = Field(
        False,
        description="cut black squares out of the pixels (PaCo/GPaCo's CIFAR pipeline) instead of zeroing the "
        "normalised batch (the original Cutout code: the mean colour)",
    )


@register_augmentation(
    "cutout",
    CutoutParams,
    citation="DeVries and Taylor, 2017, 'Improved Regularization of Convolutional Neural Networks with Cutout'",
)
def build_cutout(params: CutoutParams, context: BuildContext) -> Augmentation:
    """Cutout: squares of the normalised image set to 0 (the mean colour), centres drawn per sample."""
    from ib_plugins_builtin.augmentations._policies import Cutout

    return Cutout(length=params.length, n_holes=params.n_holes, normalised=not params.before_normalisation)  # type: ignore[no-any-return]


class ComposeParams(Params):
    policies: list[dict[str, Any]] = Field(
        min_length=1, description="policies applied in order, each {name, params}, e.g. [autoaugment, cutout]"
    )


class _Compose:
    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def draw(self, n: int, generator: Any) -> dict[str, Any]:
        raise NotImplementedError("the engine applies the parts of a composed policy one by one")

    def apply(self, images: Any, draws: Any) -> Any:
        raise NotImplementedError("the engine applies the parts of a composed policy one by one")


@register_augmentation("compose", ComposeParams)
def build_compose(params: ComposeParams, context: BuildContext) -> _Compose:
    """Several policies in order (pixel policies first, then those on the normalised batch, like cutout)."""
    from ibcore.engine.augment import order_problem

    parts = []
    issues = []
    for i, spec in enumerate(params.policies):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            issues.append(ConfigIssue(f"params.policies[{i}]", "needs a name, e.g. {name: cutout}"))
            continue
        extra = set(spec) - {"name", "params"}
        if extra:
            issues.append(ConfigIssue(f"params.policies[{i}]", f"unknown keys {sorted(extra)}; use name and params"))
            continue
        try:
            parts.append(build("augmentation", name, spec.get("params") or {}, context=context))
        except ConfigError as exc:
            issues += [ConfigIssue(f"params.policies[{i}].{issue.path}", issue.message) for issue in exc.issues]
    if issues:
        raise ConfigError(issues)
    composed = _Compose(parts)
    from ibcore.engine.augment import policy_parts

    problem = order_problem(policy_parts(composed))  # type: ignore[arg-type]
    if problem is not None:
        raise ConfigError([ConfigIssue("params.policies", problem)])
    return composed


__all__ = [
    "build_autoaugment",
    "build_color_jitter",
    "build_compose",
    "build_cutout",
    "build_randaugment",
    "build_standard",
    "build_trivialaugment",
]
