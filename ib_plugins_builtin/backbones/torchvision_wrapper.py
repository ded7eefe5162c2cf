"""Wrap a randomly initialised torchvision classification model so it follows the backbone protocol.

The model's last ``nn.Linear`` with ``num_classes`` outputs (``fc`` for ResNets, ``classifier[-1]``
for VGG/MobileNet/EfficientNet, ``heads.head`` for ViT, ...) becomes ``classifier``; the rest of
the network computes ``features``. Models whose last layer is not linear (SqueezeNet) are refused.
Hidden-layer mixing (manifold mixup) is offered for the ResNet family only: layer ``k`` is the
output of ``layer{k}``, so ``num_mix_layers`` is 4; other models mix at the input only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ib_plugins_builtin.backbones._common import check_mix_layer
from ibcore import ConfigError, ConfigIssue

RESNET_FAMILY_PREFIXES: tuple[str, ...] = ("resnet", "resnext", "wide_resnet")
# Models built with auxiliary heads by default: switch them off so forward returns plain logits,
# and pass init_weights to keep torchvision's own init without its FutureWarning.
_AUX_LOGIT_MODELS = ("googlenet", "inception_v3")


def available_archs() -> list[str]:
    """Names of torchvision's image classification models (``torchvision.models.list_models``)."""
    import torchvision.models as models

    return sorted(models.list_models(module=models))


def is_resnet_family(arch: str) -> bool:
    return arch.startswith(RESNET_FAMILY_PREFIXES)


def _unknown_arch_error(arch: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        [
            ConfigIssue(
                "params.arch",
                f"unknown torchvision classification model {arch!r}.{hint} Available: {', '.join(names)}",
            )
        ]
    )


def _split_classifier(net: nn.Module, num_classes: int) -> tuple[str, nn.Linear] | None:
    """Remove the last ``nn.Linear`` with ``num_classes`` outputs from ``net``; return its path and module."""
    found: tuple[str, nn.Linear] | None = None
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = (path, module)
    if found is None:
        return None
    parent_path, _, attribute = found[0].rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, attribute, nn.Identity())
    return found


class TorchvisionBackbone(nn.Module):
    """A torchvision model whose final linear layer is exposed as ``classifier``."""

    def __init__(self, arch: str, net: nn.Module, classifier: nn.Linear, classifier_path: str) -> None:
        super().__init__()
        self.arch = arch
        self.backbone_name = f"torchvision:{arch}"
        self.net = net
        self.classifier = classifier
        self.classifier_path = classifier_path
        self.num_classes = classifier.out_features
        self.feature_dim = classifier.in_features
        self._resnet_family = is_resnet_family(arch)
        self.num_mix_layers = 4 if self._resnet_family else 0

    def _resnet_stem(self, x: Tensor) -> Tensor:
        net: Any = self.net
        return net.maxpool(net.relu(net.bn1(net.conv1(x))))

    def _resnet_stages(self) -> list[nn.Module]:
        net: Any = self.net
        return [net.layer1, net.layer2, net.layer3, net.layer4]

    def _resnet_pool(self, hidden: Tensor) -> Tensor:
        net: Any = self.net
        return net.avgpool(hidden).flatten(1)

    def features(self, x: Tensor) -> Tensor:
        """Features before the classifier, (N, feature_dim)."""
        if not self._resnet_family:
            return self.net(x).flatten(1)
        hidden = self._resnet_stem(x)
        for stage in self._resnet_stages():
            hidden = stage(hidden)
        return self._resnet_pool(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def forward_mixed(self, x: Tensor, layer: int, mix: Callable[[Tensor], Tensor]) -> Tensor:
        """Logits with ``mix`` applied to the input (0) or, for ResNets, the output of ``layer{k}``."""
        check_mix_layer(self.backbone_name, layer, self.num_mix_layers)
        if not self._resnet_family:
            return self.forward(mix(x))
        hidden = self._resnet_stem(mix(x) if layer == 0 else x)
        for index, stage in enumerate(self._resnet_stages(), start=1):
            hidden = stage(hidden)
            if index == layer:
                hidden = mix(hidden)
        return self.classifier(self._resnet_pool(hidden))

    def reset_classifier(self) -> None:
        """Re-initialise the classifier with PyTorch's default ``nn.Linear`` init."""
        self.classifier.reset_parameters()


def _replace_resnet_stem(net: Any, in_channels: int, cifar_stem: bool) -> None:
    """A new first conv for ``in_channels``: 3x3 stride 1 and no max-pool for ``cifar_stem``, else 7x7 stride 2."""
    out_channels = net.conv1.out_channels
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    else:
        net.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
    # torchvision's own init for ResNet convs.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")


def _pretrained(models: Any, arch: str, params: Any, num_classes: int, kwargs: dict[str, Any]) -> Any:
    """``arch`` with pretrained weights (torchvision's by name, or a local state dict) and, where the weights'
    classifier has another number of classes, a new classifier (PyTorch's default init) for ``num_classes``."""
    import torch

    if params.weights is not None:
        try:
            weights = models.get_model_weights(arch)[params.weights] if params.weights != "DEFAULT" else "DEFAULT"
        except KeyError:
            names = ", ".join(w.name for w in models.get_model_weights(arch))
            raise ConfigError(
                [ConfigIssue("params.weights", f"{arch!r} has no weights {params.weights!r}; it has: {names}, DEFAULT")]
            ) from None
        source = {"weights": weights}
        if arch in _AUX_LOGIT_MODELS:
            source["aux_logits"] = True  # torchvision's pretrained GoogLeNet/Inception carry their auxiliary heads
        net = models.get_model(arch, **source)
        if arch in _AUX_LOGIT_MODELS:
            net.aux_logits, net.AuxLogits = False, None
            if hasattr(net, "aux1"):
                net.aux1 = net.aux2 = None
    else:
        path = params.weights_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError([ConfigIssue("params.weights_path", f"no such file: {path}")]) from None
        except Exception as exc:  # not a torch file, or objects weights_only refuses (pickled code)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                [ConfigIssue("params.weights_path", f"{path} is not a state dict torch can load safely: {reason}")]
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a checkpoint that wraps the state dict
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError([ConfigIssue("params.weights_path", f"{path} does not hold a state dict of tensors")])
        net = models.get_model(arch, **{**kwargs, "num_classes": num_classes})
        own = net.state_dict()
        found = _last_linear(net)
        head = f"{found[0]}." if found is not None else None
        fresh_head = {k for k in own if head is not None and k.startswith(head)}
        if fresh_head and any(k in state and state[k].shape != own[k].shape for k in fresh_head):
            state = {k: v for k, v in state.items() if head is None or not k.startswith(head)}  # other classes
        else:
            fresh_head = set()
        missing = sorted(set(own) - set(state) - fresh_head)
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            parts = [
                f"{label} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong))
                if keys
            ]
            raise ConfigError(
                [ConfigIssue("params.weights_path", f"{path} is not a state dict of {arch!r}: " + "; ".join(parts))]
            )
        net.load_state_dict(state, strict=False)
        return net
    found = _last_linear(net)
    if found is not None and found[1].out_features != num_classes:
        parent_path, _, attribute = found[0].rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        setattr(parent, attribute, torch.nn.Linear(found[1].in_features, num_classes))
    return net


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    """The path and module of ``net``'s last ``nn.Linear`` (its classifier), without changing ``net``."""
    found = None
    for path, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (path, module)
    return found


def build_torchvision_backbone(params: Any, num_classes: int) -> TorchvisionBackbone:
    """Build ``params.arch`` with random weights (``weights=None``: nothing is downloaded), or pretrained ones."""
    import torchvision.models as models

    arch = params.arch
    names = available_archs()
    if arch not in names:
        raise _unknown_arch_error(arch, names)
    resnet_family = is_resnet_family(arch)
    if params.cifar_stem and not resnet_family:
        raise ConfigError(
            [
                ConfigIssue(
                    "params.cifar_stem",
                    "cifar_stem is available for the ResNet family only (resnet*, resnext*, wide_resnet*), "
                    f"not {arch!r}",
                )
            ]
        )
    if params.in_channels != 3 and not resnet_family:
        raise ConfigError(
            [
                ConfigIssue(
                    "params.in_channels",
                    f"in_channels other than 3 is available for the ResNet family only, not {arch!r}",
                )
            ]
        )
    pretrained = getattr(params, "weights", None) is not None or getattr(params, "weights_path", None) is not None
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch in _AUX_LOGIT_MODELS:
        kwargs.update(aux_logits=False, init_weights=True)
    if pretrained:
        net = _pretrained(models, arch, params, num_classes, kwargs)
    else:
        net = models.get_model(arch, **kwargs)
    if resnet_family and (params.cifar_stem or params.in_channels != 3):
        _replace_resnet_stem(net, params.in_channels, params.cifar_stem)
    split = _split_classifier(net, num_classes)
    if split is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "params.arch",
                    f"torchvision model {arch!r} does not end in a linear classifier with {num_classes} outputs "
                    "(e.g. SqueezeNet ends in a convolution); choose another architecture",
                )
            ]
        )
    classifier_path, classifier = split
    return TorchvisionBackbone(arch, net, classifier, classifier_path)
