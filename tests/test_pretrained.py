"""Pretrained weights for torchvision backbones: a local state dict (read with weights_only=True; the test writes
its own file, nothing downloads) or torchvision's weights by name; the classifier fits the data set's classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import ibcore
from ibcore.errors import ConfigError

CONTEXT = ibcore.BuildContext(num_classes=10, class_counts=tuple([10] * 10))


def saved_resnet18(tmp_path: Path, num_classes: int = 1000) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=num_classes)
    path = tmp_path / f"resnet18_{num_classes}.pt"
    torch.save(reference.state_dict(), path)
    return path, reference


def test_a_local_state_dict_gives_the_trunk_and_a_new_classifier_for_the_classes(tmp_path: Path) -> None:
    path, reference = saved_resnet18(tmp_path)
    model = ibcore.build("backbone", "torchvision", {"arch": "resnet18", "weights_path": str(path)}, context=CONTEXT)
    trunk = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    mine = model.net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in trunk.items())
    assert model.classifier.out_features == 10 and model.classifier.in_features == 512
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_a_state_dict_with_the_same_classes_loads_the_classifier_too(tmp_path: Path) -> None:
    path, reference = saved_resnet18(tmp_path, num_classes=10)
    model = ibcore.build("backbone", "torchvision", {"arch": "resnet18", "weights_path": str(path)}, context=CONTEXT)
    assert torch.equal(model.classifier.weight, reference.fc.weight)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"arch": "resnet34"}, "is not a state dict of 'resnet34': missing layer1.2"),
        ({"arch": "resnet18", "weights_path": "nowhere.pt"}, "no such file: nowhere.pt"),
    ],
)
def test_a_wrong_file_is_refused_at_weights_path(tmp_path: Path, params: dict[str, str], message: str) -> None:
    path, _ = saved_resnet18(tmp_path)
    params = {"weights_path": str(path), **params}
    with pytest.raises(ConfigError) as caught:
        ibcore.build("backbone", "torchvision", params, context=CONTEXT)
    (issue,) = caught.value.issues
    assert issue.path == "params.weights_path" and message in issue.message


class _Code:
    """An object weights_only refuses to unpickle (it would run code)."""


def test_a_file_holding_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Code()}, path)
    with pytest.raises(ConfigError, match="is not a state dict torch can load safely"):
        ibcore.build("backbone", "torchvision", {"arch": "resnet18", "weights_path": str(path)}, context=CONTEXT)


def test_torchvision_weights_are_named_as_torchvision_names_them() -> None:
    with pytest.raises(ConfigError) as caught:
        ibcore.build("backbone", "torchvision", {"arch": "resnet18", "weights": "IMAGENET9K"}, context=CONTEXT)
    assert "has no weights 'IMAGENET9K'; it has: IMAGENET1K_V1" in caught.value.issues[0].message


@pytest.mark.parametrize(
    "params",
    [
        {"arch": "resnet18", "weights": "DEFAULT", "weights_path": "w.pt"},
        {"arch": "resnet18", "weights_path": "w.pt", "cifar_stem": True},
    ],
)
def test_conflicting_weight_params_are_refused_before_anything_loads(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ibcore.validate_params("backbone", "torchvision", params)
