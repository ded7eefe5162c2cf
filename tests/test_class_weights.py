"""Class weights: the ``class_weights`` spec every weighted loss accepts, and compute_class_weights."""

from __future__ import annotations

import math

import pytest

import ibcore
from ib_plugins_builtin.losses.class_weights import compute_class_weights
from ibcore import BuildContext, ConfigError, ContextError

# CIFAR-10-LT, imbalance ratio 100: n_i = int(5000 * (1/100)^(i/9)).
# Source: /work/shared/reference/vectors.json, "cifar10_lt_counts"["100"].
CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]

# Class-balanced weights (1-beta)/(1-beta^n), rescaled to sum to C (Cui et al., CVPR 2019).
# Source: /work/shared/reference/vectors.json, "cb_weights_cifar10_lt_if100"; the 0.999 row is also the
# "Got class-balancing weights" log line of the original imbalance-baselines README.
CB_WEIGHTS_BETA_0999 = [0.1812, 0.1894, 0.2157, 0.2729, 0.3785, 0.5606, 0.8688, 1.3862, 2.2584, 3.6883]
CB_WEIGHTS_BETA_09999 = [0.0506, 0.0769, 0.1211, 0.195, 0.3188, 0.5246, 0.8683, 1.4426, 2.4092, 3.9927]


@pytest.mark.parametrize(("beta", "expected"), [(0.999, CB_WEIGHTS_BETA_0999), (0.9999, CB_WEIGHTS_BETA_09999)])
def test_effective_number_weights_match_reference(beta: float, expected: list[float]) -> None:
    weights = compute_class_weights({"name": "effective_number", "beta": beta}, CIFAR10_LT_IF100)
    assert [round(w, 4) for w in weights] == expected
    assert math.isclose(sum(weights), 10.0)


def test_inverse_and_sqrt_inverse_are_rescaled_to_sum_to_num_classes() -> None:
    # counts [4, 1]: 1/n = [0.25, 1] -> *2/1.25; 1/sqrt(n) = [0.5, 1] -> *2/1.5 (hand computation).
    assert compute_class_weights({"name": "inverse"}, [4, 1]) == pytest.approx([0.4, 1.6])
    assert compute_class_weights({"name": "sqrt_inverse"}, [4, 1]) == pytest.approx([2 / 3, 4 / 3])


def test_beta_zero_gives_uniform_weights_and_none_gives_ones() -> None:
    assert compute_class_weights({"name": "effective_number", "beta": 0.0}, [50, 5, 1]) == pytest.approx([1, 1, 1])
    assert compute_class_weights({"name": "none"}, [50, 5, 1]) == [1.0, 1.0, 1.0]
    assert compute_class_weights(None, [50, 5, 1]) == [1.0, 1.0, 1.0]


def test_explicit_list_is_used_as_given() -> None:
    assert compute_class_weights([0.5, 2.0, 1.0], [50, 5, 1]) == [0.5, 2.0, 1.0]
    assert compute_class_weights([0.5, 2.0], num_classes=2) == [0.5, 2.0]


def test_explicit_list_of_wrong_length_says_expected_and_got() -> None:
    context = BuildContext(num_classes=10, class_counts=tuple(CIFAR10_LT_IF100))
    with pytest.raises(ConfigError, match="expected 10 class weights.*got 3") as info:
        ibcore.build("loss", "cross_entropy", {"class_weights": [1.0, 2.0, 3.0]}, context=context)
    assert info.value.issues[0].path == "params.class_weights"


def test_unknown_scheme_name_is_rejected_with_a_suggestion() -> None:
    expected = "unknown class-weight scheme 'efective_number'.*Did you mean 'effective_number'"
    with pytest.raises(ConfigError, match=expected):
        ibcore.build("loss", "focal", {"class_weights": {"name": "efective_number"}})


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"name": "effective_number", "beta": 1.0}, "params.class_weights.beta"),
        ({"name": "effective_number", "beta": -0.1}, "params.class_weights.beta"),
    ],
)
def test_out_of_range_beta_is_reported_with_its_path(spec: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        ibcore.build("loss", "ldam", {"class_weights": spec}, context=BuildContext(class_counts=(10, 1)))
    assert [issue.path for issue in info.value.issues] == [path]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "effective_number", "bta": 0.99},
            "unknown key 'bta' for class weights 'effective_number'; did you mean 'beta'?",
        ),
        ({"name": "inverse", "beta": 0.99}, "unknown key 'beta' for class weights 'inverse'; allowed keys: name"),
    ],
)
def test_unknown_scheme_keys_are_named_with_a_suggestion(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ibcore.build("loss", "ldam", {"class_weights": spec}, context=BuildContext(class_counts=(10, 1)))
    assert [(issue.path, issue.message) for issue in info.value.issues] == [("params.class_weights", message)]


@pytest.mark.parametrize("spec", ["inverse", 3, {"beta": 0.9}, [1.0, -1.0], [1.0, float("nan")]])
def test_malformed_specs_are_config_errors(spec: object) -> None:
    with pytest.raises(ConfigError, match="class_weights"):
        compute_class_weights(spec, [10, 1])


def test_computed_schemes_need_class_counts() -> None:
    with pytest.raises(ContextError, match="loss 'cross_entropy'.*class_counts"):
        ibcore.build("loss", "cross_entropy", {"class_weights": {"name": "inverse"}}, context=BuildContext())


def test_an_empty_class_is_named() -> None:
    with pytest.raises(ContextError, match="class 1 has 0"):
        compute_class_weights({"name": "effective_number"}, [10, 0, 3])


def test_counts_must_match_num_classes() -> None:
    context = BuildContext(num_classes=3, class_counts=(10, 1))
    with pytest.raises(ContextError, match="2 entries but num_classes is 3"):
        ibcore.build("loss", "focal", {"class_weights": {"name": "inverse"}}, context=context)


def test_losses_expose_the_weights_they_use() -> None:
    import torch

    context = BuildContext(num_classes=10, class_counts=tuple(CIFAR10_LT_IF100))
    spec = {"name": "effective_number", "beta": 0.9999}
    for name in ("cross_entropy", "sigmoid_cross_entropy", "focal", "ldam"):
        loss = ibcore.build("loss", name, {"class_weights": spec}, context=context)
        assert torch.allclose(loss.class_weights, torch.tensor(CB_WEIGHTS_BETA_09999), atol=5e-5), name
        unweighted = ibcore.build("loss", name, {"class_weights": {"name": "none"}}, context=context)
        assert unweighted.class_weights is None, name
