"""RIDE's multi-expert CIFAR ResNet-32 (Wang et al., ICLR 2021), without the expert router.

The official ``model/ldam_drw_resnets/ride_resnet_cifar.py`` (frank-xwang/RIDE-LongTailRecognition @ ab8be5c):
a shared stem and first stage (16 channels), then one copy of stages 2 and 3 per expert (24 and 48
channels with the official ``reduce_dimension``, 32 and 64 without), a global average pool and a cosine
classifier per expert whose logits are scaled by ``s = 30``. The model's logits are the mean of the experts'
logits, as the official evaluation takes them. The router (the "expert assignment" stage) is left out.

Registering imports no torch: the network is defined the first time a model is built (or its class is
read from this module), so ``ib list`` and ``ib validate`` stay light.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ibcore import BuildContext, Params, register_backbone

if TYPE_CHECKING:
    from torch import nn

RIDE_CITATION = "Wang et al., ICLR 2021, 'Long-tailed Recognition by Routing Diverse Distribution-Aware Experts'"

SHARED_CHANNELS = 16
EXPERT_CHANNELS = {True: (24, 48), False: (32, 64)}  # reduce_dimension -> (stage 2, stage 3) channels
BLOCKS_PER_STAGE = 5  # ResNet-32: depth 6 * 5 + 2


class RideResNetParams(Params):
    """Params of ``ride_resnet32``."""

    in_channels: int = Field(3, ge=1, description="channels of the input images")
    num_experts: int = Field(3, ge=1, description="experts (each a copy of stages 2 and 3 and a classifier)")
    reduce_dimension: bool = Field(
        True,
        description="the official RIDE width: 24/48 channels in the experts' stages 2/3 instead of ResNet-32's "
        "32/64, so three experts cost about as much as one ResNet-32",
    )
    classifier: Literal["cosine", "linear"] = Field(
        "cosine",
        description="'cosine' (the official use_norm: normalised features and class weights, logits scaled by s) "
        "or 'linear' (weights and bias, no scale)",
    )
    s: float = Field(30.0, gt=0, description="scale of the cosine logits (official s=30); cosine classifier only")
    init_seed: int | None = Field(
        None, ge=0, description="draw the initial weights from this seed (in a forked RNG) instead of the global seed"
    )

    @model_validator(mode="after")
    def _scale_needs_cosine(self) -> RideResNetParams:
        if self.classifier == "linear" and "s" in self.model_fields_set:
            raise ValueError("s scales the cosine classifier only; the official linear classifier uses no scale")
        return self


@register_backbone("ride_resnet32", RideResNetParams, citation=RIDE_CITATION)
def build_ride_resnet32(params: RideResNetParams, context: BuildContext) -> nn.Module:
    """RIDE's multi-expert ResNet-32 (shared stage 1, one stage 2-3 and cosine classifier per expert); no router."""
    from ib_plugins_builtin.backbones import _require_num_classes
    from ib_plugins_builtin.backbones._common import build_seeded

    num_classes = _require_num_classes("backbone 'ride_resnet32'", context)
    model_class = _classes()["RideResNet"]
    return build_seeded(  # type: ignore[no-any-return]
        params.init_seed,
        lambda: model_class(
            num_classes=num_classes,
            in_channels=params.in_channels,
            num_experts=params.num_experts,
            reduce_dimension=params.reduce_dimension,
            classifier=params.classifier,
            s=params.s if params.classifier == "cosine" else 1.0,
        ),
    )


def __getattr__(name: str) -> Any:
    """``RideResNet`` and ``ExpertClassifier``, defined (importing torch) on first access."""
    classes = _classes() if name in ("RideResNet", "ExpertClassifier") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classes() -> dict[str, type]:
    """Define the torch modules (once): kept out of module import so registering imports no torch."""
    import contextlib
    from collections.abc import Callable, Iterator

    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    from ib_plugins_builtin.backbones._common import NormedLinear, check_mix_layer
    from ib_plugins_builtin.backbones.resnet_cifar import BasicBlock

    def make_stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(BLOCKS_PER_STAGE - 1)]
        return nn.Sequential(*blocks)

    def official_cosine_init(head: NormedLinear) -> None:
        """The official NormedLinear's draw: a (D, C) uniform(-1, 1) weight, each class column renormed to 1."""
        with torch.no_grad():
            drawn = torch.empty(head.in_features, head.out_features, device=head.weight.device)
            drawn.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
            head.weight.copy_(drawn.t())

    def cosine_head(in_features: int, out_features: int) -> NormedLinear:
        """A cosine head that consumes the random stream as the official one does (one seed, the same weights)."""
        with torch.random.fork_rng(devices=[]):  # NormedLinear's own (C, D) draw is discarded
            head = NormedLinear(in_features, out_features)
        official_cosine_init(head)
        return head

    class ExpertClassifier(nn.Module):
        """One classifier per expert over the concatenated expert features; the logits are the experts' mean.

        ``forward(features)`` (N, num_experts * expert_dim) -> (N, C), the mean over experts of
        ``s * cos(feature_e, w_e,c)`` (or of a linear head's logits), so ``classifier(features(x))`` is the model's
        output. ``expert_logits(features)`` gives each expert's logits, (num_experts, N, C).
        """

        def __init__(self, num_experts: int, expert_dim: int, num_classes: int, kind: str, s: float) -> None:
            super().__init__()
            self.num_experts = num_experts
            self.expert_dim = expert_dim
            self.in_features = num_experts * expert_dim
            self.out_features = num_classes
            self.kind = kind
            self.s = s
            self.linears = nn.ModuleList(
                cosine_head(expert_dim, num_classes) if kind == "cosine" else nn.Linear(expert_dim, num_classes)
                for _ in range(num_experts)
            )
            self._record: list[Tensor] | None = None

        def reset_parameters(self) -> None:
            """The official init: cosine heads uniform with unit-norm class vectors, linear heads Kaiming-normal."""
            for linear in self.linears:
                if isinstance(linear, NormedLinear):
                    official_cosine_init(linear)
                else:
                    linear.reset_parameters()  # type: ignore[operator]
                    nn.init.kaiming_normal_(linear.weight)  # type: ignore[arg-type]

        def expert_logits(self, features: Tensor) -> Tensor:
            """Each expert's logits, (num_experts, N, C)."""
            if features.dim() != 2 or features.shape[1] != self.in_features:
                raise ValueError(
                    f"ride classifier expects features of shape (N, {self.in_features}) ({self.num_experts} experts "
                    f"x {self.expert_dim}), got {tuple(features.shape)}"
                )
            chunks = features.split(self.expert_dim, dim=1)
            return torch.stack([linear(chunk) * self.s for linear, chunk in zip(self.linears, chunks, strict=True)])

        def forward(self, features: Tensor) -> Tensor:
            experts = self.expert_logits(features)
            if self._record is not None:
                self._record.append(experts)
            return experts.mean(dim=0)

        def extra_repr(self) -> str:
            return f"experts={self.num_experts}, expert_dim={self.expert_dim}, classes={self.out_features}, s={self.s}"

    class RideResNet(nn.Module):
        """RIDE ResNet-32: shared ``conv1``/``bn1``/``layer1``, per-expert ``layer2s``/``layer3s``, ``classifier``.

        Module names follow the official code (its ``linears.i`` live here as ``classifier.linears.i``, with the
        cosine weight stored (C, D) instead of (D, C)). Mix layers: 0 is the input, 1 the shared stage's output,
        2 and 3 the outputs of every expert's stages 2 and 3 (each expert mixed with the same plan).
        """

        backbone_name = "ride_resnet32"

        def __init__(
            self,
            num_classes: int,
            in_channels: int = 3,
            num_experts: int = 3,
            reduce_dimension: bool = True,
            classifier: str = "cosine",
            s: float = 30.0,
        ) -> None:
            super().__init__()
            stage2, stage3 = EXPERT_CHANNELS[reduce_dimension]
            self.num_classes = num_classes
            self.num_experts = num_experts
            self.expert_dim = stage3
            self.feature_dim = num_experts * stage3
            self.num_mix_layers = 3
            self.conv1 = nn.Conv2d(in_channels, SHARED_CHANNELS, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(SHARED_CHANNELS)
            self.layer1 = make_stage(SHARED_CHANNELS, SHARED_CHANNELS, 1)
            self.layer2s = nn.ModuleList(make_stage(SHARED_CHANNELS, stage2, 2) for _ in range(num_experts))
            self.layer3s = nn.ModuleList(make_stage(stage2, stage3, 2) for _ in range(num_experts))
            self.classifier = ExpertClassifier(num_experts, stage3, num_classes, classifier, s)
            # The official _weights_init, applied once everything is built: with one seed, every weight is the
            # official code's (the cosine weights transposed).
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(module.weight)

        def _shared(self, x: Tensor) -> Tensor:
            return F.relu(self.bn1(self.conv1(x)))

        @staticmethod
        def _pool(hidden: Tensor) -> Tensor:
            # The official F.avg_pool2d over the whole map (written for square maps), flattened.
            return F.avg_pool2d(hidden, tuple(hidden.shape[2:])).flatten(1)

        def features(self, x: Tensor) -> Tensor:
            """The experts' pooled features side by side, (N, num_experts * expert_dim)."""
            shared = self.layer1(self._shared(x))
            return torch.cat(
                [self._pool(layer3(layer2(shared))) for layer2, layer3 in zip(self.layer2s, self.layer3s, strict=True)],
                dim=1,
            )

        def forward(self, x: Tensor) -> Tensor:
            """The mean of the experts' logits (the official output), (N, C)."""
            return self.classifier(self.features(x))  # type: ignore[no-any-return]

        def expert_logits(self, x: Tensor) -> Tensor:
            """Each expert's logits, (num_experts, N, C); their mean is ``forward(x)``."""
            return self.classifier.expert_logits(self.features(x))  # type: ignore[no-any-return]

        @contextlib.contextmanager
        def recording_expert_logits(self) -> Iterator[list[Tensor]]:
            """Inside the block, every forward pass appends its (num_experts, N, C) expert logits to the list it
            yields: a step gets them from the pass it makes through ``run.forward`` (and the run's DDP wrapper)."""
            record: list[Tensor] = []
            self.classifier._record = record
            try:
                yield record
            finally:
                self.classifier._record = None

        def forward_mixed(self, x: Tensor, layer: int, mix: Callable[[Tensor], Tensor]) -> Tensor:
            """Logits with ``mix`` applied to the input (0), the shared stage's output (1) or every expert's stage 2
            (2) or stage 3 (3) output."""
            check_mix_layer(self.backbone_name, layer, self.num_mix_layers)
            hidden = mix(x) if layer == 0 else x
            hidden = self.layer1(self._shared(hidden))
            if layer == 1:
                hidden = mix(hidden)
            pooled = []
            for layer2, layer3 in zip(self.layer2s, self.layer3s, strict=True):
                expert = layer2(hidden)
                if layer == 2:
                    expert = mix(expert)
                expert = layer3(expert)
                if layer == 3:
                    expert = mix(expert)
                pooled.append(self._pool(expert))
            return self.classifier(torch.cat(pooled, dim=1))  # type: ignore[no-any-return]

        def reset_classifier(self) -> None:
            """Re-initialise every expert's classifier (classifier re-training)."""
            self.classifier.reset_parameters()

    for cls in (ExpertClassifier, RideResNet):
        cls.__qualname__ = cls.__name__  # found by pickle through this module's __getattr__
    return {"RideResNet": RideResNet, "ExpertClassifier": ExpertClassifier}


__all__ = ["RideResNetParams", "build_ride_resnet32"]
