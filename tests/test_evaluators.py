"""Built-in evaluators: hand-computed values, percent units, batch accumulation, reset, clear errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import ibcore
from ibcore import BuildContext, ConfigError, ContextError, DataError

EVALUATORS = [
    "accuracy",
    "per_class_accuracy",
    "shot_accuracy",
    "balanced_accuracy",
    "macro_f1",
    "ece",
    "nll",
    "confusion_matrix",
]
# CIFAR-10-LT, imbalance ratio 100: n_i = int(5000 * 0.01^(i/9)) (../shared/reference/vectors.json).
CIFAR10_LT_IR100 = (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)


def build(name: str, params: dict | None = None, num_classes: int = 3, class_counts: tuple[int, ...] | None = None):
    counts = class_counts if class_counts is not None else tuple([50] * num_classes)
    context = BuildContext(num_classes=num_classes, class_counts=counts)
    return ibcore.build("evaluator", name, params or {}, context=context)


def logits_for(predictions: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``predictions``."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 3.0


def evaluate(evaluator, logits: torch.Tensor, targets: list[int] | torch.Tensor) -> dict:
    evaluator.update(logits, torch.as_tensor(targets))
    return evaluator.compute()


# Three classes; targets [0,0,1,1,2,2], predictions [0,1,1,1,0,2]. Confusion matrix (rows = true):
# [[1,1,0],[0,2,0],[1,0,1]]. Recalls 1/2, 2/2, 1/2. F1 = 2TP/(2TP+FP+FN): 2/4, 4/5, 2/3.
TARGETS = [0, 0, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 0, 2]


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_top_k_accuracy_in_percent():
    logits = torch.tensor(
        [
            [5.0, 4, 3, 2, 1, 0],  # target 0: rank 1
            [5.0, 4, 3, 2, 1, 0],  # target 4: rank 5
            [0.0, 1, 2, 3, 4, 5],  # target 0: rank 6
            [1.0, 9, 2, 3, 4, 5],  # target 5: rank 2
        ]
    )
    result = evaluate(build("accuracy", {"top_k": [1, 2, 5]}, num_classes=6), logits, [0, 4, 0, 5])
    assert result == {"acc1": 25.0, "acc2": 50.0, "acc5": 75.0}


def test_per_class_accuracy_reports_absent_classes_as_none():
    result = evaluate(build("per_class_accuracy", num_classes=4), logits_for(PREDICTIONS, 4), TARGETS)
    assert result["per_class_acc"] == [50.0, 100.0, 50.0, None]
    assert result["classes_without_samples"] == [3]


def test_balanced_accuracy_is_the_mean_recall_of_present_classes():
    result = evaluate(build("balanced_accuracy", num_classes=4), logits_for(PREDICTIONS, 4), TARGETS)
    assert result["balanced_acc"] == pytest.approx(100 * (0.5 + 1.0 + 0.5) / 3)


def test_macro_f1_by_hand():
    result = evaluate(build("macro_f1", num_classes=4), logits_for(PREDICTIONS, 4), TARGETS)
    # Class 3 never occurs (neither target nor prediction) and is left out, as scikit-learn does.
    assert result["macro_f1"] == pytest.approx(100 * (2 / 4 + 4 / 5 + 2 / 3) / 3)


def test_macro_f1_counts_a_predicted_but_absent_class_as_zero():
    predictions = [0, 1, 1, 1, 3, 2]  # class 3 predicted once, never a target: F1 = 0
    result = evaluate(build("macro_f1", num_classes=4), logits_for(predictions, 4), TARGETS)
    # class 0: TP1 FP0 FN1 -> 2/3; class 1: TP2 FP1 FN0 -> 4/5; class 2: TP1 FP0 FN1 -> 2/3; class 3: 0.
    assert result["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 2 / 3 + 0) / 4)


def test_confusion_matrix_rows_are_true_classes():
    result = evaluate(build("confusion_matrix"), logits_for(PREDICTIONS, 3), TARGETS)
    assert result == {"confusion_matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}


def _calibration_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Two classes; logits [log(p/(1-p)), 0] give confidence p for class 0.
    logits = torch.tensor(
        [
            [math.log(9.0), 0.0],  # confidence 0.9, predicts 0, target 0: correct
            [math.log(9.0), 0.0],  # confidence 0.9, predicts 0, target 1: wrong
            [0.0, math.log(7 / 3)],  # confidence 0.7, predicts 1, target 1: correct
            [math.log(3.0), 0.0],  # confidence 0.75, predicts 0, target 0: correct
        ]
    )
    return logits, torch.tensor([0, 1, 1, 0])


def test_ece_by_hand_with_fifteen_bins():
    logits, targets = _calibration_batch()
    # Bins of width 1/15: 0.9 in (13/15, 14/15], 0.7 in (10/15, 11/15], 0.75 in (11/15, 12/15].
    # ECE = 2/4 * |1/2 - 0.9| + 1/4 * |1 - 0.7| + 1/4 * |1 - 0.75| = 0.2 + 0.075 + 0.0625 = 0.3375.
    result = evaluate(build("ece", num_classes=2), logits, targets)
    assert result["ece"] == pytest.approx(33.75)


def test_ece_with_one_bin_is_the_gap_between_accuracy_and_mean_confidence():
    logits, targets = _calibration_batch()
    result = evaluate(build("ece", {"num_bins": 1}, num_classes=2), logits, targets)
    assert result["ece"] == pytest.approx(100 * abs(3 / 4 - (0.9 + 0.9 + 0.7 + 0.75) / 4))


def test_nll_is_the_mean_negative_log_likelihood():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    result = evaluate(build("nll", num_classes=2), logits, [0, 0])
    assert result["nll"] == pytest.approx((math.log(2) - math.log(0.75)) / 2)


# ---------------------------------------------------------------------------------------------
# Shot groups


def test_shot_groups_on_cifar10_lt_ir100():
    evaluator = build("shot_accuracy", num_classes=10, class_counts=CIFAR10_LT_IR100)
    # Kang et al.: many > 100 training images (139 and up), medium 20..100 (83, 50), few < 20 (none).
    result = evaluate(evaluator, logits_for(list(range(10)), 10), list(range(10)))
    assert result["shot_groups"] == {"many": [0, 1, 2, 3, 4, 5, 6, 7], "medium": [8, 9], "few": []}
    assert result["many_acc"] == 100.0 and result["medium_acc"] == 100.0
    assert result["few_acc"] is None  # an empty group reports None, never NaN


def test_shot_accuracy_averages_per_class_accuracies():
    counts = (500, 300, 60, 5)  # many, many, medium, few
    evaluator = build("shot_accuracy", num_classes=4, class_counts=counts)
    # class 0: 4 test images, all right (100%); class 1: 1 image, wrong (0%); class 2: 1 of 2; class 3: absent.
    targets = [0, 0, 0, 0, 1, 2, 2]
    predictions = [0, 0, 0, 0, 0, 2, 0]
    result = evaluate(evaluator, logits_for(predictions, 4), targets)
    assert result["many_acc"] == 50.0  # the mean of 100% and 0%, not the pooled 4/5 = 80%
    assert result["medium_acc"] == 50.0
    assert result["few_acc"] is None  # its only class has no test images


def test_shot_thresholds_are_strict_and_configurable():
    counts = (101, 100, 20, 19)
    groups = evaluate(build("shot_accuracy", num_classes=4, class_counts=counts), logits_for([0], 4), [0])
    assert groups["shot_groups"] == {"many": [0], "medium": [1, 2], "few": [3]}
    custom = build("shot_accuracy", {"many_threshold": 50, "few_threshold": 50}, num_classes=4, class_counts=counts)
    assert evaluate(custom, logits_for([0], 4), [0])["shot_groups"] == {"many": [0, 1], "medium": [], "few": [2, 3]}


def test_shot_accuracy_needs_train_class_counts():
    with pytest.raises(ContextError, match="class_counts"):
        ibcore.build("evaluator", "shot_accuracy", {}, context=BuildContext(num_classes=3))
    with pytest.raises(ConfigError, match="few_threshold"):
        build("shot_accuracy", {"many_threshold": 10, "few_threshold": 20})


# ---------------------------------------------------------------------------------------------
# Accumulation, reset, errors


def _random_batch(n: int = 60, num_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, num_classes, generator=generator) * 2
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    return logits, targets


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name", EVALUATORS)
def test_several_batches_equal_one_big_batch(name):
    logits, targets = _random_batch()
    params = {"top_k": [1, 3]} if name == "accuracy" else {}
    counts = (200, 120, 60, 30, 10)
    whole, parts = build(name, params, 5, counts), build(name, params, 5, counts)
    whole.update(logits, targets)
    for chunk in (slice(0, 7), slice(7, 40), slice(40, 60)):
        parts.update(logits[chunk], targets[chunk])
    _assert_same(whole.compute(), parts.compute())


@pytest.mark.parametrize("name", EVALUATORS)
def test_reset_clears_the_state(name):
    logits, targets = _random_batch()
    counts = (200, 120, 60, 30, 10)
    fresh, reused = build(name, {}, 5, counts), build(name, {}, 5, counts)
    reused.update(logits[:30], targets[:30])
    reused.reset()
    reused.update(logits[30:], targets[30:])
    fresh.update(logits[30:], targets[30:])
    _assert_same(fresh.compute(), reused.compute())


@pytest.mark.parametrize("name", EVALUATORS)
def test_compute_before_any_update_reports_no_numbers(name):
    result = build(name, {}, 3).compute()
    scalars = [value for value in result.values() if not isinstance(value, (list, dict))]
    assert all(value is None for value in scalars)


def test_keys_are_plain_and_percent_labels_say_so_and_are_in_percent():
    logits, targets = _random_batch()
    for name in EVALUATORS:
        evaluator = build(name, {}, 5, (200, 120, 60, 30, 10))
        result = evaluate(evaluator, logits, targets)
        for key, value in result.items():
            assert key.isidentifier(), key  # usable as a pandas column or a tracker's metric name as it is
            if evaluator.labels.get(key, "").endswith(" (%)") and isinstance(value, float):
                assert 0.0 <= value <= 100.0
        assert set(evaluator.labels) <= set(result), name  # a label names a key the evaluator reports
    accuracy = evaluate(build("accuracy", {}, 5), logits, targets)["acc1"]
    assert accuracy == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())


def test_display_labels_and_headlines_of_the_built_in_evaluators():
    from ibcore.report.labels import display_label, evaluator_labels, headline_key

    counts = (200, 120, 60, 30, 10)
    built = [build(name, {"top_k": [1, 5]} if name == "accuracy" else {}, 5, counts) for name in EVALUATORS]
    labels = evaluator_labels(built)
    assert {k: labels[k] for k in ("acc1", "acc5", "many_acc", "medium_acc", "few_acc", "balanced_acc")} == {
        "acc1": "acc@1 (%)",
        "acc5": "acc@5 (%)",
        "many_acc": "many (%)",
        "medium_acc": "medium (%)",
        "few_acc": "few (%)",
        "balanced_acc": "balanced (%)",
    }
    assert labels["ece"] == "ece (%)" and labels["macro_f1"] == "macro F1 (%)"
    assert display_label("nll", labels) == "nll"  # no label declared: the key is shown
    # the first evaluator (in the config's order) that declares a headline gives it
    assert headline_key(built) == "acc1"
    assert headline_key([b for b in built if b.name != "accuracy"]) == "balanced_acc"
    assert headline_key([build("ece", {}, 5), build("nll", {}, 5)]) is None


def test_bfloat16_logits_are_accepted():
    logits, targets = _random_batch()
    result = evaluate(build("nll", {}, 5), logits.bfloat16(), targets)
    expected = torch.nn.functional.cross_entropy(logits.bfloat16().float(), targets).item()
    assert result["nll"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["per_class_accuracy", "nll", "confusion_matrix"])
def test_targets_outside_the_classes_are_reported(name):
    evaluator = build(name, {}, 3)
    evaluator.update(logits_for([0, 1], 3), torch.tensor([0, 7]))
    with pytest.raises(DataError, match="outside the class range 0..2"):
        evaluator.compute()


def test_logits_of_the_wrong_width_are_a_clear_error():
    with pytest.raises(DataError, match=r"shape \(N, 3\)"):
        build("accuracy").update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_top_k_beyond_the_class_count_is_rejected():
    with pytest.raises(ConfigError, match="params.top_k"):
        build("accuracy", {"top_k": [1, 5]}, num_classes=3)


def test_registering_the_evaluators_imports_no_torch():
    # `ib list` and `ib validate` import the kind package; torch, torchvision and numpy stay unloaded.
    code = (
        "import sys, ibcore, ib_plugins_builtin.evaluators; "
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
