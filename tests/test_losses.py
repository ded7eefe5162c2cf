"""Built-in losses: each against its paper's formula, its official code's normalisation, and hand numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ibcore
from ibcore import BuildContext, ContextError, DataError

# CIFAR-10-LT, imbalance ratio 100 (source: /work/shared/reference/vectors.json, "cifar10_lt_counts"["100"]).
CIFAR10_LT_IF100 = (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)

# Source: /work/shared/reference/vectors.json, "sigmoid_focal_vector" (sum over classes and samples / N).
FOCAL_LOGITS = [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]
FOCAL_LABELS = [0, 2]
FOCAL_GAMMA_05 = 2.29196
FOCAL_GAMMA_05_WEIGHTED = 2.999286  # class weights [0.6, 0.9, 1.5]

COUNTS = (50, 20, 5)
CONTEXT = BuildContext(num_classes=3, class_counts=COUNTS)
ALL_LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.1, "class_weights": {"name": "inverse"}}),
    ("cross_entropy", {"class_weights": [0.2, 1.0, 3.0], "weighted_normalisation": "batch"}),
    ("sigmoid_cross_entropy", {"class_weights": {"name": "sqrt_inverse"}}),
    ("focal", {"gamma": 0.5}),
    ("focal", {"gamma": 2.0, "class_weights": {"name": "effective_number", "beta": 0.99}}),
    ("focal", {"variant": "softmax", "class_weights": {"name": "inverse"}}),
    ("ldam", {}),
    ("ldam", {"class_weights": {"name": "effective_number", "beta": 0.9999}}),
    ("balanced_softmax", {}),
    ("logit_adjusted", {"tau": 1.5}),
    ("label_aware_smoothing", {}),
]


def build(name: str, params: dict[str, Any] | None = None, context: BuildContext = CONTEXT) -> Any:
    return ibcore.build("loss", name, params or {}, context=context)


def batch(n: int = 6, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    targets = torch.arange(n) % c
    return logits, targets


# ---- the protocol -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_sample_weight_of_one_is_the_plain_loss_and_mixing_splits_it(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params)
    logits, targets = batch()
    plain = loss(logits, targets)
    assert plain.dim() == 0 and torch.isfinite(plain)
    assert torch.equal(loss(logits, targets, torch.ones(6, dtype=torch.float64)), plain)
    # The normaliser does not depend on the sample weights: the two halves of a mixed batch add up.
    w = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.3], dtype=torch.float64)
    assert torch.allclose(loss(logits, targets, w) + loss(logits, targets, 1 - w), plain)
    assert loss(logits, targets, torch.zeros(6, dtype=torch.float64)) == 0


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_gradients_are_correct_and_class_weights_are_exposed(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params)
    assert hasattr(loss, "class_weights")
    assert (loss.class_weights is None) == ("class_weights" not in params)
    logits, targets = batch(n=4)
    logits.requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: loss(z, targets, w), (logits,))


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_half_precision_logits_give_a_float32_loss(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params)
    logits, targets = batch()
    value = loss(logits.to(torch.bfloat16), targets)
    assert value.dtype == torch.float32
    assert torch.isclose(value.double(), loss(logits, targets), atol=0.05)


def test_importing_the_losses_does_not_import_torch() -> None:
    code = "import sys, ib_plugins_builtin.losses; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- cross_entropy ---------------------------------------------------------------------------------


def test_cross_entropy_matches_pytorch() -> None:
    logits, targets = batch()
    assert torch.allclose(build("cross_entropy")(logits, targets), F.cross_entropy(logits, targets))
    smoothed = build("cross_entropy", {"label_smoothing": 0.2})(logits, targets)
    assert torch.allclose(smoothed, F.cross_entropy(logits, targets, label_smoothing=0.2))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_weighted_cross_entropy_normalisations(label_smoothing: float) -> None:
    logits, targets = batch()
    weights = [0.2, 1.0, 3.0]
    w = torch.tensor(weights, dtype=torch.float64)
    per_sample = F.cross_entropy(logits, targets, weight=w, label_smoothing=label_smoothing, reduction="none")
    params = {"class_weights": weights, "label_smoothing": label_smoothing}
    # weight_sum (default): PyTorch's weighted mean, sum(w_y l) / sum(w_y).
    default = build("cross_entropy", params)(logits, targets)
    pytorch_mean = F.cross_entropy(logits, targets, weight=w, label_smoothing=label_smoothing)
    assert torch.allclose(default, pytorch_mean)
    assert torch.allclose(default, per_sample.sum() / w[targets].sum())
    # batch: Cui et al.'s class-balanced softmax, sum(w_y l) / N.
    by_batch = build("cross_entropy", {**params, "weighted_normalisation": "batch"})(logits, targets)
    assert torch.allclose(by_batch, per_sample.sum() / len(targets))


# ---- sigmoid focal and sigmoid cross-entropy ----------------------------------------------------------


def test_sigmoid_focal_reproduces_the_reference_vector() -> None:
    logits = torch.tensor(FOCAL_LOGITS, dtype=torch.float64)
    labels = torch.tensor(FOCAL_LABELS)
    context = BuildContext(num_classes=3)
    plain = build("focal", {"gamma": 0.5}, context)(logits, labels)
    weighted = build("focal", {"gamma": 0.5, "class_weights": [0.6, 0.9, 1.5]}, context)(logits, labels)
    assert float(plain) == pytest.approx(FOCAL_GAMMA_05, abs=1e-5)
    assert float(weighted) == pytest.approx(FOCAL_GAMMA_05_WEIGHTED, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_sigmoid_focal_agrees_with_torchvision(gamma: float) -> None:
    torchvision_ops = pytest.importorskip("torchvision.ops")
    logits, targets = batch(n=8, c=5)
    one_hot = F.one_hot(targets, 5).to(logits.dtype)
    expected = torchvision_ops.sigmoid_focal_loss(logits, one_hot, alpha=-1, gamma=gamma, reduction="sum") / 8
    assert torch.allclose(build("focal", {"gamma": gamma}, BuildContext())(logits, targets), expected)


def test_sigmoid_cross_entropy_is_focal_with_gamma_zero() -> None:
    logits, targets = batch()
    weights = [0.5, 1.0, 2.0]
    one_hot = F.one_hot(targets, 3).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
    # Cui et al.: the true class's weight multiplies all C terms of the sample; sum / N.
    expected = (torch.tensor(weights, dtype=torch.float64)[targets][:, None] * bce).sum() / len(targets)
    sigmoid_ce = build("sigmoid_cross_entropy", {"class_weights": weights})(logits, targets)
    focal_zero = build("focal", {"gamma": 0.0, "class_weights": weights})(logits, targets)
    assert torch.allclose(sigmoid_ce, expected)
    assert torch.allclose(focal_zero, expected)


def test_sigmoid_focal_is_stable_for_extreme_logits() -> None:
    logits = torch.tensor([[300.0, -300.0, 0.0], [-300.0, 300.0, 5.0]], requires_grad=True)
    value = build("focal", {"gamma": 2.0})(logits, torch.tensor([1, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # Sample 0: the true class at -300 and the wrong class at +300 each give BCE 300 with modulator 1,
    # the class at 0 gives log(2) * 0.5^2. Sample 1: only the wrong class at 5 counts, softplus(5) * sigmoid(5)^2.
    sigmoid_5 = 1 / (1 + math.exp(-5))
    expected = (600.0 + 0.25 * math.log(2) + math.log1p(math.exp(5)) * sigmoid_5**2) / 2
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)


# ---- softmax focal ------------------------------------------------------------------------------------


def test_softmax_focal_follows_ldam_drw() -> None:
    # Hand computation on the reference logits, gamma = 1, class weights [0.6, 0.9, 1.5]:
    # ce_i = w_{y_i} * (logsumexp(z_i) - z_{i,y_i}); loss = mean_i (1 - exp(-ce_i)) * ce_i.
    expected_terms = []
    weights = [0.6, 0.9, 1.5]
    for row, label in zip(FOCAL_LOGITS, FOCAL_LABELS, strict=True):
        ce = weights[label] * (math.log(sum(math.exp(v) for v in row)) - row[label])
        expected_terms.append((1 - math.exp(-ce)) * ce)
    logits = torch.tensor(FOCAL_LOGITS, dtype=torch.float64)
    loss = build("focal", {"variant": "softmax", "gamma": 1.0, "class_weights": weights}, BuildContext())
    # Tolerance 1e-7: class weights are float32 buffers, as in the official code.
    assert float(loss(logits, torch.tensor(FOCAL_LABELS))) == pytest.approx(sum(expected_terms) / 2, rel=1e-7)


def test_softmax_focal_with_gamma_zero_is_batch_normalised_weighted_ce() -> None:
    logits, targets = batch()
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    loss = build("focal", {"variant": "softmax", "gamma": 0.0, "class_weights": w.tolist()})
    expected = F.cross_entropy(logits, targets, weight=w, reduction="none").mean()
    assert torch.allclose(loss(logits, targets), expected)


# ---- LDAM ---------------------------------------------------------------------------------------------


def test_ldam_margins_for_cifar10_lt() -> None:
    loss = build("ldam", context=BuildContext(num_classes=10, class_counts=CIFAR10_LT_IF100))
    margins = loss.margins.double()
    assert float(margins.max()) == pytest.approx(0.5) and int(margins.argmax()) == 9
    # m_i / m_j = (n_j / n_i)^(1/4) (Cao et al., eq. 13); the head's margin is 0.5 * (50 / 5000)^(1/4).
    assert float(margins[0]) == pytest.approx(0.5 * (50 / 5000) ** 0.25, rel=1e-6)
    for i, j in [(0, 9), (2, 5), (4, 7)]:
        ratio = (CIFAR10_LT_IF100[j] / CIFAR10_LT_IF100[i]) ** 0.25
        assert float(margins[i] / margins[j]) == pytest.approx(ratio, rel=1e-6)


def test_ldam_loss_by_hand() -> None:
    # counts [16, 1]: m ~ [1/2, 1] -> rescaled to max_m = 0.5 -> [0.25, 0.5]; s = 2 keeps numbers readable.
    context = BuildContext(num_classes=2, class_counts=(16, 1))
    logits = torch.tensor([[0.2, 0.5], [0.1, -0.3]], dtype=torch.float64)
    targets = torch.tensor([0, 1])

    def ce(row: list[float], label: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    l0 = ce([2 * (0.2 - 0.25), 2 * 0.5], 0)
    l1 = ce([2 * 0.1, 2 * (-0.3 - 0.5)], 1)
    plain = build("ldam", {"s": 2.0}, context)(logits, targets)
    assert float(plain) == pytest.approx((l0 + l1) / 2, rel=1e-12)
    # DRW: class weights, mean over the true classes' weights (official F.cross_entropy(weight=...)).
    weighted = build("ldam", {"s": 2.0, "class_weights": [0.25, 1.75]}, context)(logits, targets)
    assert float(weighted) == pytest.approx((0.25 * l0 + 1.75 * l1) / (0.25 + 1.75), rel=1e-12)


def test_ldam_drw_stage_rebuilds_the_same_margins_with_weights() -> None:
    context = BuildContext(num_classes=10, class_counts=CIFAR10_LT_IF100)
    first = build("ldam", {"max_m": 0.5, "s": 30}, context)
    drw = build("ldam", {"class_weights": {"name": "effective_number", "beta": 0.9999}}, context)
    assert torch.equal(first.margins, drw.margins) and first.s == drw.s
    assert first.class_weights is None and drw.class_weights is not None
    logits, targets = batch(n=20, c=10)
    w = drw.class_weights.double()
    m = first.margins.double()
    expected = F.cross_entropy(30 * (logits - m[targets][:, None] * F.one_hot(targets, 10)), targets, weight=w)
    assert torch.allclose(drw(logits, targets), expected)


# ---- prior-shifted cross-entropy ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), [("balanced_softmax", {}), ("logit_adjusted", {"tau": 1.0})])
def test_prior_shifted_losses_equal_cross_entropy_for_balanced_counts(name: str, params: dict[str, Any]) -> None:
    logits, targets = batch()
    loss = build(name, params, BuildContext(num_classes=3, class_counts=(7, 7, 7)))
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits, targets))


def test_balanced_softmax_and_logit_adjustment_by_hand() -> None:
    context = BuildContext(num_classes=2, class_counts=(3, 1))
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    tail = torch.tensor([1])
    # Balanced Softmax: softmax(z + log n) at z = 0 is n / sum(n) -> -log(1/4).
    assert float(build("balanced_softmax", context=context)(zeros, tail)) == pytest.approx(math.log(4))
    # tau = 1: softmax(log pi) = pi -> -log(0.25); tau = 0.5: p_1 = sqrt(.25) / (sqrt(.75) + sqrt(.25)).
    assert float(build("logit_adjusted", {"tau": 1.0}, context)(zeros, tail)) == pytest.approx(math.log(4))
    half = -math.log(0.5 / (math.sqrt(0.75) + 0.5))
    assert float(build("logit_adjusted", {"tau": 0.5}, context)(zeros, tail)) == pytest.approx(half, rel=1e-7)
    assert float(build("logit_adjusted", {"tau": 0.0}, context)(zeros, tail)) == pytest.approx(math.log(2))


# ---- label-aware smoothing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "middle"),
    [
        ("concave", 0.1 + 0.3 * math.sin(math.pi / 2 * 4 / 9)),  # ~0.29284
        ("linear", 0.1 + 0.3 * 4 / 9),  # ~0.23333
        ("convex", 0.4 + 0.3 * math.sin(1.5 * math.pi + math.pi / 2 * 4 / 9)),  # ~0.17019
    ],
)
def test_label_aware_smoothing_values(shape: str, middle: float) -> None:
    # counts [100, 50, 10]: r = (n - 10) / 90 = [1, 4/9, 0]; head 0.4 (most frequent), tail 0.1 (MiSLAS formula).
    loss = build("label_aware_smoothing", {"shape": shape}, BuildContext(class_counts=(100, 50, 10)))
    assert loss.smoothing.double().tolist() == pytest.approx([0.4, middle, 0.1], abs=1e-6)


def test_label_aware_smoothing_loss_by_hand() -> None:
    context = BuildContext(class_counts=(100, 50, 10))
    loss = build("label_aware_smoothing", {"shape": "linear", "smooth_head": 0.4, "smooth_tail": 0.1}, context)
    row = [1.0, 0.0, -1.0]
    log_z = math.log(sum(math.exp(v) for v in row))
    log_p = [v - log_z for v in row]
    eps = 0.1 + 0.3 * 4 / 9  # class 1
    expected = (1 - eps) * -log_p[1] + eps * -sum(log_p) / 3
    value = loss(torch.tensor([row], dtype=torch.float64), torch.tensor([1]))
    assert float(value) == pytest.approx(expected, rel=1e-12)


def test_label_aware_smoothing_with_equal_counts_is_label_smoothing() -> None:
    logits, targets = batch()
    loss = build("label_aware_smoothing", {"smooth_head": 0.3, "smooth_tail": 0.0}, BuildContext(class_counts=(5,) * 3))
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.3))


def test_label_aware_smoothing_exp_shape_needs_a_power() -> None:
    with pytest.raises(ibcore.ConfigError, match="power"):
        build("label_aware_smoothing", {"shape": "exp"})
    loss = build("label_aware_smoothing", {"shape": "exp", "power": 2.0}, BuildContext(class_counts=(100, 50, 10)))
    assert loss.smoothing.double().tolist() == pytest.approx([0.4, 0.1 + 0.3 * (4 / 9) ** 2, 0.1], abs=1e-6)


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ldam", "balanced_softmax", "logit_adjusted", "label_aware_smoothing"])
def test_losses_that_need_class_counts_say_so(name: str) -> None:
    with pytest.raises(ContextError, match=f"loss '{name}'.*class_counts"):
        build(name, context=BuildContext(num_classes=3))


def test_ldam_rejects_an_empty_class() -> None:
    with pytest.raises(ContextError, match="class 2 has 0"):
        build("ldam", context=BuildContext(class_counts=(10, 3, 0)))


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_out_of_range_targets_are_named(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params)
    logits, _ = batch(n=3)
    with pytest.raises(DataError, match=r"targets\[1\] = 3 is not a class index in \[0, 3\)"):
        loss(logits, torch.tensor([0, 3, 1]))
    with pytest.raises(DataError, match=r"targets\[2\] = -1"):
        loss(logits, torch.tensor([0, 1, -1]))


def test_shape_and_dtype_mistakes_are_clear() -> None:
    loss = build("cross_entropy")
    logits, targets = batch()
    with pytest.raises(DataError, match=r"targets of shape \(N,\) = \(6,\)"):
        loss(logits, targets[:4])
    with pytest.raises(DataError, match="integer class indices"):
        loss(logits, targets.double())
    with pytest.raises(DataError, match=r"logits of shape \(N, C\)"):
        loss(logits[0], targets)
    with pytest.raises(DataError, match="built for 3 classes but got logits with 5 columns"):
        loss(torch.randn(6, 5), targets)
    with pytest.raises(DataError, match="sample_weight of shape"):
        loss(logits, targets, torch.ones(5))


def test_check_targets_can_be_switched_off() -> None:
    loss = build("balanced_softmax", {"check_targets": False})
    logits, _ = batch(n=2)
    with pytest.raises(Exception) as info:  # left to PyTorch: an IndexError on the CPU, a device assert on CUDA
        loss(logits, torch.tensor([0, 7]))
    assert not isinstance(info.value, DataError)


def test_bad_params_are_rejected_before_building() -> None:
    with pytest.raises(ibcore.ConfigError, match="gamma"):
        build("focal", {"gamma": -1.0})
    with pytest.raises(ibcore.ConfigError, match="variant"):
        build("focal", {"variant": "softmaxx"})
    with pytest.raises(ibcore.ConfigError, match="s"):
        build("ldam", {"s": 0})


# ---- devices -------------------------------------------------------------------------------------------


def test_buffers_follow_the_module_and_the_logits() -> None:
    loss = build("ldam", {"class_weights": {"name": "inverse"}})
    logits, targets = batch()
    expected = loss(logits, targets)
    loss.to(torch.float64)  # buffers move and convert with the module, as any nn.Module's
    assert loss.margins.dtype == torch.float64
    assert torch.allclose(loss(logits, targets), expected)
    assert loss.state_dict() == {}  # derived from params + context: nothing to checkpoint


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_built_in_losses_may_be_replayed_from_a_cuda_graph(name: str, params: dict[str, Any]) -> None:
    """They are pure functions of their tensors (the engine's CUDA graphs rely on it), except when asked to
    check every target's value, which reads the targets back to the host."""
    assert build(name, params).cuda_graph_safe is True
    assert build(name, {**params, "check_targets": True}).cuda_graph_safe is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_losses_run_on_cuda(name: str, params: dict[str, Any]) -> None:
    logits, targets = batch()
    on_cpu = build(name, params)(logits, targets)
    cuda_context = BuildContext(num_classes=3, class_counts=COUNTS, device="cuda")
    loss = build(name, params, cuda_context)
    if loss.class_weights is not None:
        assert loss.class_weights.is_cuda
    value = loss(logits.cuda(), targets.cuda(), torch.ones(6, device="cuda", dtype=torch.float64))
    assert value.is_cuda and torch.allclose(value.cpu(), on_cpu)
    # Built on the CPU, used on CUDA: the buffers are moved per call rather than failing.
    assert torch.allclose(build(name, params)(logits.cuda(), targets.cuda()).cpu(), on_cpu)


@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_losses_run_under_vmap_over_stacked_runs(name: str, params: dict[str, Any]) -> None:
    # The fused path evaluates several runs' logits at once with torch.func.vmap.
    loss = build(name, params)
    logits = torch.randn(2, 6, 3, dtype=torch.float64)
    targets = torch.stack([torch.arange(6) % 3, torch.tensor([2, 2, 1, 0, 0, 1])])
    w = torch.rand(6, dtype=torch.float64)
    fused = torch.func.vmap(lambda z, y: loss(z, y, w))(logits, targets)
    assert torch.allclose(fused, torch.stack([loss(z, y, w) for z, y in zip(logits, targets, strict=True)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "params"), ALL_LOSSES)
def test_losses_do_not_synchronise_with_the_host_on_cuda(name: str, params: dict[str, Any]) -> None:
    # With check_targets left at null, a CUDA training step never waits for the device.
    loss = build(name, params, BuildContext(num_classes=3, class_counts=COUNTS, device="cuda"))
    logits = torch.randn(8, 3, device="cuda", requires_grad=True)
    targets = torch.arange(8, device="cuda") % 3
    w = torch.rand(8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (loss(logits, targets, w) + loss(logits, targets.flip(0), 1 - w)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
