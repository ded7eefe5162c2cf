"""Built-in backbones (registered on import; torch is imported by the factories).

Every backbone follows :class:`ibcore.protocols.Backbone`: ``forward(x) -> logits``,
``features(x) -> (N, feature_dim)``, ``forward_mixed(x, layer, mix)`` for manifold mixup and
``reset_classifier()`` for classifier re-training. Mix layers use Verma et al.'s numbering:
0 is the input image and ``k`` is the output of stage ``k`` (the stem belongs to stage 1).
Weights are drawn from torch's global RNG, so a seeded trainer builds identical models;
``init_seed`` draws them from a private seed instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from ibcore import BuildContext, ContextError, DataPath, Params, register_backbone

if TYPE_CHECKING:
    from ib_plugins_builtin.backbones._common import StagedBackbone
    from ib_plugins_builtin.backbones.torchvision_wrapper import TorchvisionBackbone

ClassifierKind = Literal["linear", "cosine"]

_CLASSIFIER_HELP = (
    "'linear' (weights and bias) or 'cosine' (LDAM's NormedLinear: cosine between the normalised feature "
    "and each normalised class weight, in [-1, 1], no bias; pair it with a loss that scales logits, e.g. ldam s=30)"
)
_SIGMOID_BIAS_HELP = (
    "initialise the classifier bias to -log(C-1), i.e. a prior probability 1/C per class under a sigmoid, "
    "as the official class-balanced loss code does for sigmoid and focal losses (Cui et al., CVPR 2019)"
)
_INIT_SEED_HELP = "draw the initial weights from this seed (in a forked RNG) instead of the global torch seed"


class _ClassifierParams(Params):
    classifier: ClassifierKind = Field("linear", description=_CLASSIFIER_HELP)
    sigmoid_bias_init: bool = Field(False, description=_SIGMOID_BIAS_HELP)
    init_seed: int | None = Field(None, ge=0, description=_INIT_SEED_HELP)

    @model_validator(mode="after")
    def _bias_needs_linear(self) -> _ClassifierParams:
        if self.sigmoid_bias_init and self.classifier == "cosine":
            raise ValueError("sigmoid_bias_init needs classifier 'linear'; the cosine classifier has no bias")
        return self


class CifarResNetParams(_ClassifierParams):
    """Params of the CIFAR ResNets (resnet20/32/44/56/110)."""

    in_channels: int = Field(3, ge=1, description="channels of the input images")


class SmallCnnParams(_ClassifierParams):
    """Params of the small CNN."""

    in_channels: int = Field(1, ge=1, description="channels of the input images")
    width: int = Field(16, ge=1, description="channels of the first conv; the second has 2*width")


class TorchvisionParams(Params):
    """Params of a torchvision classification model."""

    arch: str = Field(..., min_length=1, description="model name, as torchvision.models.list_models() spells it")
    cifar_stem: bool = Field(
        False,
        description="resnet family only: a 3x3 stride-1 first conv and no max-pool, for 32x32 inputs",
    )
    in_channels: int = Field(3, ge=1, description="channels of the input images (other than 3: resnet family only)")
    init_seed: int | None = Field(None, ge=0, description=_INIT_SEED_HELP)
    weights: str | None = Field(
        None,
        description="pretrained weights by torchvision's name (e.g. IMAGENET1K_V2 or DEFAULT): torchvision downloads "
        "them when they are not in its cache; the classifier is replaced by a new one for the data set's classes",
    )
    weights_path: Annotated[str, DataPath] | None = Field(
        None,
        description="pretrained weights from a local file: a state dict of this architecture (torch.save), read with "
        "weights_only=True; a classifier of another size is replaced by a new one",
    )

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> TorchvisionParams:
        if self.weights is not None and self.weights_path is not None:
            raise ValueError("give weights (a torchvision name) or weights_path (a local file), not both")
        if (self.weights is not None or self.weights_path is not None) and (self.cifar_stem or self.in_channels != 3):
            raise ValueError(
                "pretrained weights need the architecture's own first convolution: drop cifar_stem and in_channels"
            )
        return self


def _require_num_classes(component: str, context: BuildContext) -> int:
    """``context.num_classes`` as an int, or a ContextError naming ``component``."""
    context.require(component, "num_classes")
    num_classes = int(context.num_classes)  # type: ignore[arg-type]  # require() checked it is set
    if num_classes < 1:
        raise ContextError(f"{component} needs num_classes >= 1 in its BuildContext, got {num_classes}.")
    return num_classes


_HE_2016 = "He et al., CVPR 2016, 'Deep Residual Learning for Image Recognition'"


def _build_cifar_resnet(depth: int, params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    from ib_plugins_builtin.backbones._common import build_seeded, classifier_kwargs
    from ib_plugins_builtin.backbones.resnet_cifar import CifarResNet

    component = f"backbone 'resnet{depth}'"
    num_classes = _require_num_classes(component, context)
    kwargs = classifier_kwargs(component, params, num_classes)
    return build_seeded(
        params.init_seed,
        lambda: CifarResNet(depth=depth, num_classes=num_classes, in_channels=params.in_channels, **kwargs),
    )


@register_backbone("resnet20", CifarResNetParams, citation=_HE_2016)
def build_resnet20(params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    """ResNet-20 for 32x32 images: 3 stages of 3 basic blocks (16/32/64 channels), option-A shortcuts."""
    return _build_cifar_resnet(20, params, context)


@register_backbone("resnet32", CifarResNetParams, citation=_HE_2016)
def build_resnet32(params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    """ResNet-32 for 32x32 images (the CIFAR-LT standard): 3 stages of 5 basic blocks, option-A shortcuts."""
    return _build_cifar_resnet(32, params, context)


@register_backbone("resnet44", CifarResNetParams, citation=_HE_2016)
def build_resnet44(params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    """ResNet-44 for 32x32 images: 3 stages of 7 basic blocks (16/32/64 channels), option-A shortcuts."""
    return _build_cifar_resnet(44, params, context)


@register_backbone("resnet56", CifarResNetParams, citation=_HE_2016)
def build_resnet56(params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    """ResNet-56 for 32x32 images: 3 stages of 9 basic blocks (16/32/64 channels), option-A shortcuts."""
    return _build_cifar_resnet(56, params, context)


@register_backbone("resnet110", CifarResNetParams, citation=_HE_2016)
def build_resnet110(params: CifarResNetParams, context: BuildContext) -> StagedBackbone:
    """ResNet-110 for 32x32 images: 3 stages of 18 basic blocks (16/32/64 channels), option-A shortcuts."""
    return _build_cifar_resnet(110, params, context)


@register_backbone("small_cnn", SmallCnnParams)
def build_small_cnn(params: SmallCnnParams, context: BuildContext) -> StagedBackbone:
    """A two-conv CNN with BatchNorm that trains in seconds on a CPU (the quickstart backbone, 28x28 digits)."""
    from ib_plugins_builtin.backbones._common import build_seeded, classifier_kwargs
    from ib_plugins_builtin.backbones.small_cnn import SmallCnn

    component = "backbone 'small_cnn'"
    num_classes = _require_num_classes(component, context)
    kwargs = classifier_kwargs(component, params, num_classes)
    return build_seeded(
        params.init_seed,
        lambda: SmallCnn(num_classes=num_classes, in_channels=params.in_channels, width=params.width, **kwargs),
    )


@register_backbone("torchvision", TorchvisionParams)
def build_torchvision(params: TorchvisionParams, context: BuildContext) -> TorchvisionBackbone:
    """Any torchvision classification model by name: random weights, or pretrained ones (a name or a local file)."""
    from ib_plugins_builtin.backbones._common import build_seeded
    from ib_plugins_builtin.backbones.torchvision_wrapper import build_torchvision_backbone

    num_classes = _require_num_classes(f"backbone 'torchvision' ({params.arch})", context)
    return build_seeded(params.init_seed, lambda: build_torchvision_backbone(params, num_classes))


__all__ = [
    "CifarResNetParams",
    "SmallCnnParams",
    "TorchvisionParams",
    "build_resnet20",
    "build_resnet32",
    "build_resnet44",
    "build_resnet56",
    "build_resnet110",
    "build_small_cnn",
    "build_torchvision",
]
