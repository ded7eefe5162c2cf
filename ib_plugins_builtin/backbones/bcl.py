"""BCL's CIFAR network (Zhu et al., CVPR 2022): the CIFAR ResNet-32 with a projection head and a class-centre head.

The official ``BCLModel`` (FlamieZhu/Balanced-Contrastive-Learning @ f72d070, ``models/resnext.py``) on the
built-in ResNet-32: an encoder, ``head`` = Linear(feature, hidden) - BatchNorm1d - ReLU - Linear(hidden,
feat_dim) for the contrastive projection, a classifier (``use_norm``: the official ``NormedLinear``, cosine
logits scaled by ``s = 30``) and ``head_fc``, a second MLP of the same shape that maps each class's classifier
weight to a class centre in the projection space. The official code has no CIFAR model; the widths here
(64 -> 512 -> 128) are the CIFAR setting reported for the paper (see docs/components/bcl.md).

The network's output is the classifier's logits (what evaluation and every other step see). The ``bcl`` step
asks for the normalised projection and class centres with :meth:`recording_contrastive`, so they come from
the same pass through ``run.forward`` (and the run's DDP wrapper) as the logits.

Registering imports no torch: the network is defined the first time a model is built (or its class is read
from this module), so ``ib list`` and ``ib validate`` stay light.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from ibcore import BuildContext, Params, register_backbone

if TYPE_CHECKING:
    from torch import nn

BCL_CITATION = "Zhu et al., CVPR 2022, 'Balanced Contrastive Learning for Long-Tailed Visual Recognition'"
DEPTH = 32


class BCLResNetParams(Params):
    """Params of ``bcl_resnet32`` (defaults: the CIFAR setting; the official ``BCLModel`` otherwise)."""

    in_channels: int = Field(3, ge=1, description="channels of the input images")
    feat_dim: int = Field(
        128,
        ge=1,
        description="size of the contrastive projection and of the class centres (CIFAR setting 128; the official "
        "ImageNet main.py uses --feat_dim 1024)",
    )
    hidden_dim: int = Field(
        512,
        ge=1,
        description="hidden width of both MLP heads (CIFAR setting 512: 64 -> 512 -> 128); the official BCLModel "
        "uses the encoder's feature width, 64 for ResNet-32",
    )
    use_norm: bool = Field(
        True,
        description="the official cosine classifier (NormedLinear: normalised features and class weights, logits "
        "scaled by `scale`; official --use_norm True); false: a linear classifier with bias, unscaled",
    )
    scale: float = Field(30.0, gt=0, description="scale of the cosine logits (the official NormedLinear's s = 30)")
    init_seed: int | None = Field(
        None, ge=0, description="draw the initial weights from this seed (in a forked RNG) instead of the global seed"
    )

    @model_validator(mode="after")
    def _scale_needs_norm(self) -> BCLResNetParams:
        if not self.use_norm and "scale" in self.model_fields_set:
            raise ValueError("scale applies to the cosine classifier (use_norm: true) only")
        return self


@register_backbone("bcl_resnet32", BCLResNetParams, citation=BCL_CITATION)
def build_bcl_resnet32(params: BCLResNetParams, context: BuildContext) -> nn.Module:
    """CIFAR ResNet-32 with BCL's projection head and class-centre head (MLPs 64-512-128), cosine classifier s=30."""
    from ib_plugins_builtin.backbones import _require_num_classes
    from ib_plugins_builtin.backbones._common import build_seeded

    num_classes = _require_num_classes("backbone 'bcl_resnet32'", context)
    model_class = _classes()["BCLResNet"]
    return build_seeded(  # type: ignore[no-any-return]
        params.init_seed,
        lambda: model_class(
            num_classes=num_classes,
            in_channels=params.in_channels,
            feat_dim=params.feat_dim,
            hidden_dim=params.hidden_dim,
            use_norm=params.use_norm,
            scale=params.scale,
        ),
    )


def __getattr__(name: str) -> Any:
    """``BCLResNet`` and ``ScaledNormedLinear``, defined (importing torch) on first access."""
    classes = _classes() if name in ("BCLResNet", "ScaledNormedLinear") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classes() -> dict[str, type]:
    """Define the torch modules (once): kept out of module import so registering imports no torch."""
    import contextlib
    from collections.abc import Iterator

    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    from ib_plugins_builtin.backbones._common import NormedLinear
    from ib_plugins_builtin.backbones.resnet_cifar import CifarResNet

    class ScaledNormedLinear(NormedLinear):
        """BCL's ``NormedLinear``: ``s * cos(feature, w_c)``, no bias; weight stored (C, D) (the official one is
        (D, C)) and drawn as the official one is (uniform (D, C), each class column renormed to 1)."""

        def __init__(self, in_features: int, out_features: int, scale: float) -> None:
            self.scale = scale
            super().__init__(in_features, out_features)

        def reset_parameters(self) -> None:
            with torch.no_grad():
                drawn = torch.empty(self.in_features, self.out_features, device=self.weight.device)
                drawn.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
                self.weight.copy_(drawn.t())

        def forward(self, features: Tensor) -> Tensor:
            return self.scale * super().forward(features)

        def extra_repr(self) -> str:
            return f"{super().extra_repr()}, scale={self.scale}"

    def mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
        """The official head: Linear - BatchNorm1d - ReLU - Linear (PyTorch's default initialisation)."""
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    class BCLResNet(CifarResNet):
        """The built-in ResNet-32 (``stem``, ``stages``, ``classifier``) plus ``head`` and ``head_fc``.

        ``forward(x)`` is the classifier's logits, as for ``resnet32``; features, mixing and classifier
        re-training are the ResNet's. The heads are built in the official order (encoder, ``head``, classifier,
        ``head_fc``).
        """

        def __init__(
            self,
            num_classes: int,
            in_channels: int = 3,
            feat_dim: int = 128,
            hidden_dim: int = 512,
            use_norm: bool = True,
            scale: float = 30.0,
        ) -> None:
            super().__init__(DEPTH, num_classes, in_channels=in_channels, classifier="cosine" if use_norm else "linear")
            self.backbone_name = "bcl_resnet32"
            self.feat_dim = feat_dim
            self.hidden_dim = hidden_dim
            self.use_norm = use_norm
            self.head = mlp(self.feature_dim, hidden_dim, feat_dim)
            if use_norm:  # replaces the ResNet's unscaled cosine classifier (same place in the state dict)
                self.classifier = ScaledNormedLinear(self.feature_dim, num_classes, scale)
            self.head_fc = mlp(self.feature_dim, hidden_dim, feat_dim)
            self._record: list[tuple[Tensor, Tensor]] | None = None

        def forward(self, x: Tensor) -> Tensor:
            features = self.features(x)
            logits: Tensor = self.classifier(features)
            if self._record is not None:
                self._record.append((self.projection(features), self.class_centres()))
            return logits

        def projection(self, features: Tensor) -> Tensor:
            """``normalize(head(features))``, (N, feat_dim): the official ``feat_mlp``."""
            return F.normalize(self.head(features), dim=1)

        def class_centres(self) -> Tensor:
            """``normalize(head_fc(W))`` over the classifier's class weights W (C, D), (C, feat_dim): the official
            ``centers_logits``, which feeds ``fc.weight.T`` of its (D, C) NormedLinear, i.e. the same rows."""
            weight: Tensor = self.classifier.weight  # type: ignore[assignment]
            return F.normalize(self.head_fc(weight), dim=1)

        @contextlib.contextmanager
        def recording_contrastive(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
            """Inside the block, every forward pass appends ``(projection, class_centres)`` to the list it yields: a
            step gets them from the pass it makes through ``run.forward`` (and the run's DDP wrapper)."""
            record: list[tuple[Tensor, Tensor]] = []
            self._record = record
            try:
                yield record
            finally:
                self._record = None

        def contrastive(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """``(logits, normalised projection, normalised class centres)`` of one forward pass of ``x``."""
            with self.recording_contrastive() as record:
                logits = self(x)
            projection, centres = record[0]
            return logits, projection, centres

    for cls in (ScaledNormedLinear, BCLResNet):
        cls.__qualname__ = cls.__name__  # found by pickle through this module's __getattr__
    return {"BCLResNet": BCLResNet, "ScaledNormedLinear": ScaledNormedLinear}


__all__ = ["BCL_CITATION", "BCLResNetParams", "build_bcl_resnet32"]
