"""Built-in backbones: the published sizes, shapes, seeded init, the mixing hook, classifier re-init."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import ibcore
from ibcore import BuildContext, ConfigError, ContextError

CONTEXT = BuildContext(num_classes=10)
CIFAR_RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def build(name: str, params: dict | None = None, num_classes: int = 10):
    return ibcore.build("backbone", name, params or {}, context=BuildContext(num_classes=num_classes))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# Inputs each backbone is meant for (tiny batches keep the suite fast).
INPUTS = {
    "small_cnn": (2, 1, 28, 28),
    **{name: (2, 3, 32, 32) for name in CIFAR_RESNETS},
}


# ---------------------------------------------------------------------------------------------
# Sizes and shapes


def test_resnet32_has_the_published_parameter_count():
    # 464,154 = the ResNet-32 of LDAM-DRW's models/resnet_cifar.py ("0.46M") with a 64x10 linear head.
    assert parameter_count(build("resnet32")) == 464_154


@pytest.mark.parametrize(
    ("name", "millions"),
    # He et al. 2016, Table 6 (CIFAR-10): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_cifar_resnets_match_the_paper_sizes(name, millions):
    assert round(parameter_count(build(name)) / 1e6, 2 if millions < 1 else 1) == millions


@pytest.mark.parametrize("name", ["small_cnn", *CIFAR_RESNETS])
def test_outputs_and_features_have_the_protocol_shapes(name):
    model = build(name, num_classes=7).eval()
    x = torch.randn(INPUTS[name])
    with torch.no_grad():
        logits, features = model(x), model.features(x)
    assert logits.shape == (2, 7)
    assert features.shape == (2, model.feature_dim)
    assert model.num_classes == 7
    torch.testing.assert_close(model.classifier(features), logits)


def test_small_cnn_size_follows_width_and_input_channels():
    model = build("small_cnn", {"width": 8, "in_channels": 3})
    assert model.feature_dim == 8 * 8  # 2*width channels pooled to a 2x2 grid
    assert model.num_mix_layers == 2
    assert model(torch.randn(2, 3, 20, 20)).shape == (2, 10)  # any size >= 4x4


def test_small_cnn_uses_batchnorm():
    # The fused trainer path stacks BN buffers: the quickstart backbone must have them.
    model = build("small_cnn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_resnet_accepts_single_channel_inputs():
    model = build("resnet20", {"in_channels": 1}).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_classifier_is_the_last_module():
    model = build("resnet32")
    last_name, last_module = list(model.named_children())[-1]
    assert last_name == "classifier" and last_module is model.classifier
    assert isinstance(model.classifier, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------
# Seeded initialisation


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_building_twice_under_one_seed_gives_identical_weights(name):
    torch.manual_seed(3)
    first = build(name)
    torch.manual_seed(3)
    second = build(name)
    torch.manual_seed(4)
    other = build(name)
    assert same_state(first, second)
    assert not same_state(first, other)


def test_init_seed_fixes_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = build("small_cnn", {"init_seed": 11})
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(99)
    second = build("small_cnn", {"init_seed": 11})
    assert same_state(first, second)
    assert not same_state(first, build("small_cnn", {"init_seed": 12}))


# ---------------------------------------------------------------------------------------------
# Mixing hook


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_forward_mixed_with_identity_mix_equals_forward(name):
    model = build(name).eval()
    x = torch.randn(INPUTS[name])
    with torch.no_grad():
        expected = model(x)
        for layer in range(model.num_mix_layers + 1):
            torch.testing.assert_close(model.forward_mixed(x, layer, lambda h: h), expected)


def test_forward_mixed_applies_mix_once_at_the_requested_layer():
    model = build("resnet20").eval()
    assert model.num_mix_layers == 3
    seen: list[tuple[int, ...]] = []

    def record(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(hidden.shape[1:]))
        return hidden

    with torch.no_grad():
        for layer in range(4):
            model.forward_mixed(torch.randn(2, 3, 32, 32), layer, record)
    # Layer 0 = input; layer k = output of stage k (16, 32, 64 channels at 32, 16, 8 pixels).
    assert seen == [(3, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_forward_mixed_changes_the_output_when_the_mix_does():
    model = build("small_cnn").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        mixed = model.forward_mixed(x, 1, lambda h: h.flip(0))
    assert not torch.allclose(mixed, model(x))


def test_forward_mixed_rejects_a_layer_the_backbone_lacks():
    model = build("small_cnn")
    with pytest.raises(ConfigError, match=r"layers 0\.\.2"):
        model.forward_mixed(torch.randn(2, 1, 28, 28), 3, lambda h: h)


# ---------------------------------------------------------------------------------------------
# Classifier variants and re-initialisation


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_reset_classifier_changes_classifier_weights_only(name):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_cosine_classifier_outputs_cosines():
    model = build("resnet20", {"classifier": "cosine"}).eval()
    assert model.classifier.bias is None
    assert parameter_count(model) == parameter_count(build("resnet20")) - 10  # no bias
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32) * 10)
    assert logits.abs().max() <= 1.0 + 1e-5
    # Class weight rows start at unit norm, as LDAM's NormedLinear columns do.
    torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(10))


def test_cosine_reset_changes_classifier_weights_only():
    model = build("small_cnn", {"classifier": "cosine"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"classifier.weight"}


@pytest.mark.parametrize(("name", "num_classes"), [("resnet32", 10), ("small_cnn", 100)])
def test_sigmoid_bias_init_sets_a_prior_of_one_over_c(name, num_classes):
    model = build(name, {"sigmoid_bias_init": True}, num_classes=num_classes)
    expected = -math.log(num_classes - 1)  # official class-balanced-loss code: -log(C - 1)
    torch.testing.assert_close(model.classifier.bias, torch.full((num_classes,), expected))
    # sigmoid(b) = 1/C: each class starts with prior probability 1/C.
    torch.testing.assert_close(torch.sigmoid(model.classifier.bias), torch.full((num_classes,), 1 / num_classes))
    model.reset_classifier()
    torch.testing.assert_close(model.classifier.bias, torch.full((num_classes,), expected))


def test_sigmoid_bias_init_needs_a_linear_classifier():
    with pytest.raises(ConfigError, match="sigmoid_bias_init"):
        build("resnet32", {"classifier": "cosine", "sigmoid_bias_init": True})


def test_unknown_params_and_missing_num_classes_are_clear_errors():
    with pytest.raises(ConfigError, match="params.widht"):
        build("small_cnn", {"widht": 8})
    with pytest.raises(ContextError, match="num_classes"):
        ibcore.build("backbone", "resnet32", {}, context=BuildContext())


# ---------------------------------------------------------------------------------------------
# torchvision


def test_torchvision_resnet_follows_the_protocol():
    torch.manual_seed(0)
    model = ibcore.build("backbone", "torchvision", {"arch": "resnet18", "cifar_stem": True}, context=CONTEXT).eval()
    x = torch.randn(2, 3, 8, 8)  # small: the CIFAR stem keeps full resolution
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 10)
        assert model.features(x).shape == (2, 512) and model.feature_dim == 512
        assert model.num_mix_layers == 4
        for layer in range(5):
            torch.testing.assert_close(model.forward_mixed(x, layer, lambda h: h), logits)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier_path == "fc"
    assert model.net.conv1.kernel_size == (3, 3) and isinstance(model.net.maxpool, torch.nn.Identity)


def test_torchvision_weights_follow_the_seed():
    torch.manual_seed(5)
    first = ibcore.build("backbone", "torchvision", {"arch": "resnet18"}, context=CONTEXT)
    torch.manual_seed(5)
    second = ibcore.build("backbone", "torchvision", {"arch": "resnet18"}, context=CONTEXT)
    assert same_state(first, second)


def test_torchvision_non_resnet_mixes_at_the_input_only():
    model = ibcore.build("backbone", "torchvision", {"arch": "mobilenet_v3_small"}, context=CONTEXT).eval()
    assert model.num_mix_layers == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_mixed(x, 0, lambda h: h), model(x))
        assert model.features(x).shape == (2, model.feature_dim)
    with pytest.raises(ConfigError, match=r"layers 0\.\.0"):
        model.forward_mixed(x, 1, lambda h: h)


def test_torchvision_unknown_arch_lists_close_matches():
    with pytest.raises(ConfigError, match="Did you mean: resnet18") as caught:
        ibcore.build("backbone", "torchvision", {"arch": "resnet19"}, context=CONTEXT)
    assert "params.arch" in str(caught.value)


def test_torchvision_cifar_stem_is_for_resnets_only():
    with pytest.raises(ConfigError, match="ResNet family only"):
        ibcore.build("backbone", "torchvision", {"arch": "vgg11", "cifar_stem": True}, context=CONTEXT)


def test_torchvision_model_without_linear_head_is_refused():
    with pytest.raises(ConfigError, match="linear classifier"):
        ibcore.build("backbone", "torchvision", {"arch": "squeezenet1_1"}, context=CONTEXT)


def test_registering_the_backbones_imports_no_torch():
    # `ib list` and `ib validate` import the kind package; torch, torchvision and numpy stay unloaded.
    code = (
        "import sys, ibcore, ib_plugins_builtin.backbones; "
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
