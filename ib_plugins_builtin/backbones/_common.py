"""Pieces shared by the built-in backbones: the cosine classifier, classifier init, staged forward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibcore import ConfigError, ConfigIssue

ClassifierInit = Literal["kaiming", "default"]
T = TypeVar("T")


class NormedLinear(nn.Module):
    """Cosine classifier: ``normalize(features) @ normalize(W).T``, one unit-norm weight row per class, no bias.

    LDAM-DRW's ``NormedLinear`` (Cao et al., NeurIPS 2019) with the weight stored as
    (num_classes, in_features) like ``nn.Linear``, so code that reads per-class weight rows
    (tau-normalisation) treats both classifiers alike. Outputs lie in [-1, 1]; the loss scales them.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LDAM: uniform(-1, 1), then each class vector rescaled to unit norm.
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, features: Tensor) -> Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def make_classifier(kind: str, feature_dim: int, num_classes: int) -> nn.Module:
    """A ``linear`` or ``cosine`` classifier from ``feature_dim`` features to ``num_classes`` logits."""
    if kind == "cosine":
        return NormedLinear(feature_dim, num_classes)
    return nn.Linear(feature_dim, num_classes)


def init_classifier(classifier: nn.Module, init: ClassifierInit, sigmoid_bias_init: bool) -> None:
    """(Re-)initialise ``classifier`` in place with the backbone's scheme.

    ``kaiming``: Kaiming-normal weight, as LDAM-DRW's ``_weights_init`` does for every Linear;
    ``default``: PyTorch's own init. With ``sigmoid_bias_init`` the bias becomes -log(C-1), the
    official class-balanced loss code's prior of 1/C per class for sigmoid and focal losses.
    """
    if isinstance(classifier, NormedLinear):
        classifier.reset_parameters()
        return
    if not isinstance(classifier, nn.Linear):  # pragma: no cover - the built-ins only make these two
        raise TypeError(f"cannot initialise a {type(classifier).__name__} classifier")
    classifier.reset_parameters()
    if init == "kaiming":
        nn.init.kaiming_normal_(classifier.weight)
    if sigmoid_bias_init and classifier.bias is not None:
        with torch.no_grad():
            classifier.bias.fill_(-math.log(classifier.out_features - 1))


def classifier_kwargs(component: str, params: Any, num_classes: int) -> dict[str, Any]:
    """The classifier options of ``params``, checked against ``num_classes``."""
    if params.sigmoid_bias_init and num_classes < 2:
        raise ConfigError(
            [
                ConfigIssue(
                    "params.sigmoid_bias_init",
                    f"{component}: the sigmoid bias -log(C-1) needs at least 2 classes, got num_classes={num_classes}",
                )
            ]
        )
    return {"classifier": params.classifier, "sigmoid_bias_init": params.sigmoid_bias_init}


def build_seeded(init_seed: int | None, make: Callable[[], T]) -> T:
    """``make()``, drawing from the global torch RNG, or from ``init_seed`` in a forked CPU RNG."""
    if init_seed is None:
        return make()
    # Only the CPU generator is forked and reseeded: models are built on the CPU, and
    # torch.manual_seed would also reseed every CUDA generator outside the fork.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(init_seed)
        return make()


def check_mix_layer(backbone_name: str, layer: int, num_mix_layers: int) -> None:
    """Raise a ConfigError unless ``0 <= layer <= num_mix_layers``."""
    if not (isinstance(layer, int) and 0 <= layer <= num_mix_layers):
        raise ConfigError(
            [
                ConfigIssue(
                    "mixer.params.layers",
                    f"backbone {backbone_name} can mix at layers 0..{num_mix_layers} "
                    f"(0 = input, k = output of stage k); got {layer!r}",
                )
            ]
        )


class StagedBackbone(nn.Module):
    """A CNN made of ``stem``, ``stages`` and a pooling head, followed by ``classifier``.

    Subclasses set ``stem``, ``stages`` (an ``nn.ModuleList``) and ``feature_dim``, implement
    :meth:`pool` and call :meth:`_finish`. Mix layer 0 is the input, layer ``k`` the output of
    stage ``k`` (Verma et al.'s numbering: the stem belongs to stage 1).
    """

    stem: nn.Module
    stages: nn.ModuleList
    classifier: nn.Module
    num_classes: int
    feature_dim: int
    num_mix_layers: int
    backbone_name: str = "?"

    def _finish(self, num_classes: int, classifier: str, sigmoid_bias_init: bool, init: ClassifierInit) -> None:
        """Attach the classifier (after the body, so it is the last module) and initialise it."""
        self.num_classes = num_classes
        self.num_mix_layers = len(self.stages)
        self._classifier_init: ClassifierInit = init
        self._sigmoid_bias_init = sigmoid_bias_init
        self.classifier = make_classifier(classifier, self.feature_dim, num_classes)
        init_classifier(self.classifier, init, sigmoid_bias_init)

    def pool(self, hidden: Tensor) -> Tensor:
        """Map the last stage's output to features (N, feature_dim)."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Features before the classifier, (N, feature_dim)."""
        hidden = self.stem(x)
        for stage in self.stages:
            hidden = stage(hidden)
        return self.pool(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def forward_mixed(self, x: Tensor, layer: int, mix: Callable[[Tensor], Tensor]) -> Tensor:
        """Logits with ``mix`` applied to the input (layer 0) or to the output of stage ``layer``."""
        check_mix_layer(self.backbone_name, layer, self.num_mix_layers)
        hidden = mix(x) if layer == 0 else x
        hidden = self.stem(hidden)
        for index, stage in enumerate(self.stages, start=1):
            hidden = stage(hidden)
            if index == layer:
                hidden = mix(hidden)
        return self.classifier(self.pool(hidden))

    def reset_classifier(self) -> None:
        """Re-initialise the classifier with the scheme it was built with (classifier re-training)."""
        init_classifier(self.classifier, self._classifier_init, self._sigmoid_bias_init)
