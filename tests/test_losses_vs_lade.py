"""The VS and LADE losses against numbers from their official code, and the house rules every loss keeps.

Reference numbers were produced by running the official loss modules unchanged on the CPU (their
``.cuda()`` calls made no-ops), torch 2.14.1, float64 logits (the official per-class buffers are float32):

- VS: github.com/orparask/VS-Loss at commit 7ade9c9959951212415bb9aa4f5563caa5182e5e,
  ``class_imbalance/losses.py`` ``VSLoss(cls_num_list, gamma, tau, weight)``; the DRW weights as its
  ``train.py`` computes them (effective number, beta 0.9999, rescaled to sum to C).
- LADE: github.com/hyperconnect/LADE at commit 5db5d134720872620706025bc4dec8347ddc349b,
  ``loss/PriorCELoss.py`` ``PriorCELoss`` plus ``weight`` times ``loss/LADELoss.py`` ``LADELoss``, both on
  the same logits (``DotProductClassifier`` with ``use_route`` returns its logits twice), as
  ``run_networks.py`` adds its ``PerformanceLoss`` and ``RouteWeightLoss``; the class counts given as
  ``img_max=5000, prior=0.01`` (``utils.calculate_prior``), which yields exactly ``CIFAR10_LT_IF100``.

Our buffers are rounded to float32 at other points than the official ones, so values agree to ~1e-8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ibcore
from ibcore import BuildContext, ContextError, DataError

# CIFAR-10-LT, imbalance ratio 100 (source: /work/shared/reference/vectors.json, "cifar10_lt_counts"["100"]).
CIFAR10_LT_IF100 = (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)
CIFAR_CONTEXT = BuildContext(num_classes=10, class_counts=CIFAR10_LT_IF100)

# torch.manual_seed(0); torch.randn(8, 10), rounded to 4 decimals (the rounded values are the input).
LOGITS = [
    [-1.1258, -1.1524, -0.2506, -0.4339, 0.8487, 0.692, -0.316, -2.1152, 0.3223, -1.2633],
    [0.35, 0.3081, 0.1198, 1.2377, 1.1168, -0.2473, -1.3527, -1.6959, 0.5667, 0.7935],
    [0.5988, -1.5551, -0.3414, 1.853, 0.7502, -0.5855, -0.1734, 0.1835, 1.3894, 1.5863],
    [0.9463, -0.8437, -0.6136, 0.0316, -0.4927, 0.2484, 0.4397, 0.1124, 0.6408, 0.4412],
    [-0.1023, 0.7924, -0.2897, 0.0525, 0.5229, 2.3022, -1.4689, -1.5867, -0.6731, 0.8728],
    [1.0554, 0.1778, -0.2303, -0.3918, 0.5433, -0.3952, -0.4462, 0.744, 1.521, 3.4105],
    [-1.5312, -1.2341, 1.8197, -0.5515, -0.5692, 0.92, 1.1108, 1.2899, -1.4782, 2.5672],
    [-0.4731, 0.3356, -1.6293, -0.5497, -0.4798, -0.4997, -1.067, 1.1149, -0.1407, 0.8058],
]
# Head and tail classes, two classes seen twice, four classes (4, 6, 7, 8) absent from the batch.
TARGETS = [0, 0, 1, 3, 5, 9, 9, 2]

# Official VSLoss on (LOGITS, TARGETS) with CIFAR10_LT_IF100, by (our params, the official arguments).
VS_REFERENCE: list[tuple[dict[str, Any], float]] = [
    ({}, 2.96457361233257),  # gamma=0.3, tau=1.0: the defaults of VSLoss and of train.py's --gamma/--tau
    ({"gamma": 0.2, "tau": 1.2}, 3.092396474374),  # the README's CIFAR-10 LT-100 command
    ({"gamma": 0.0, "tau": 1.0}, 2.45744315564268),  # train.py's 'LA' (logit adjustment)
    ({"gamma": 0.3, "tau": 0.0}, 2.52919041321317),  # train.py's 'CDT'
    ({"class_weights": {"name": "effective_number", "beta": 0.9999}}, 4.73664978229788),  # VS with DRW weights
]
# 1 / VSLoss.Delta_list (the official code divides by (n_max / n_c)^gamma) and VSLoss.iota_list, float32.
VS_SCALES = [1.0, 0.8576597584801505, 0.7355308516081118, 0.6309191294458505, 0.5409746330435447]
VS_SCALES += [0.46411147959722826, 0.39806630104291696, 0.3413606410734192, 0.2924370617378859, 0.25118864283222514]
VS_OFFSETS = [-0.9087423086166382, -1.4205684661865234, -1.932618260383606, -2.444000720977783, -2.9566853046417236]
VS_OFFSETS += [-3.46751070022583, -3.9791982173919678, -4.491461753845215, -5.007094860076904, -5.513912677764893]
# d loss / d logits[5] (a tail sample) for the default VS loss.
VS_GRAD_ROW_5 = [0.0815420089184, 0.0169935909794, 0.00632991516511, 0.00301225274724, 0.00265728245247]
VS_GRAD_ROW_5 += [0.000848659348329, 0.00043889658636, 0.000347203381786, 0.000214951414542, -0.0312306698617]

# Official PriorCELoss + alpha * LADELoss(remine_lambda) on (LOGITS, TARGETS): (our params, total, LADELoss alone).
PRIOR_CE_REFERENCE = 2.45744304845907
LADE_REFERENCE: list[tuple[dict[str, Any], float, float]] = [
    ({}, 2.49861277502298, 0.411697265639117),  # alpha=0.1, remine_lambda=0.1: config/*/lade.yaml
    ({"remine_lambda": 0.01}, 2.48736617745968, 0.299231290006116),  # the README's CIFAR-100-LT command
    ({"alpha": 0.005}, 2.45950153478727, 0.411697265639117),  # the README's Places-LT command
    ({"alpha": 1.0, "remine_lambda": 0.5}, 3.3689890946893, 0.91154604623023),
]
# d loss / d logits for the default LADE loss: row 0 (class 0, seen twice) and row 5 (class 9, seen twice).
LADE_GRAD_ROW_0 = [-0.116273525306, 0.0171336590256, 0.0250797465674, 0.0124648312976, 0.0271206719656]
LADE_GRAD_ROW_0 += [0.0137865030298, 0.00314939481525, 0.000306273334306, 0.00207394005264, 0.000247489573644]
LADE_GRAD_ROW_5 = [0.0838324756143, 0.0219459693527, 0.00852004644681, 0.00428902798086, 0.00669223382854]
LADE_GRAD_ROW_5 += [0.00152845666877, 0.000987646317932, 0.00184284251506, 0.00233016962231, -0.11681526808]

# Float32 buffers rounded differently from the official ones: agreement is ~1e-8, far below any formula slip.
REL = 1e-7

COUNTS = (50, 20, 5)
SMALL_CONTEXT = BuildContext(num_classes=3, class_counts=COUNTS)
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("vs", {}),
    ("vs", {"gamma": 0.2, "tau": 1.2, "class_weights": {"name": "effective_number", "beta": 0.99}}),
    ("lade", {}),
    ("lade", {"alpha": 1.0, "remine_lambda": 0.5}),
]


def build(name: str, params: dict[str, Any] | None = None, context: BuildContext = CIFAR_CONTEXT) -> Any:
    return ibcore.build("loss", name, params or {}, context=context)


def reference_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS)


def small_batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.arange(n) % 3


# ---- against the official code ------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "expected"), VS_REFERENCE)
def test_vs_matches_the_official_code(params: dict[str, Any], expected: float) -> None:
    logits, targets = reference_batch()
    assert float(build("vs", params)(logits, targets)) == pytest.approx(expected, rel=REL)


def test_vs_scales_and_offsets_match_the_official_code() -> None:
    loss = build("vs")
    assert loss.scales.double().tolist() == pytest.approx(VS_SCALES, rel=1e-6)
    assert loss.offsets.double().tolist() == pytest.approx(VS_OFFSETS, rel=1e-6)
    # The paper's Delta_c = (n_c / n_max)^gamma and iota_c = tau * log(pi_c).
    assert loss.scales[-1].item() == pytest.approx((50 / 5000) ** 0.3, rel=1e-6)
    assert loss.offsets[-1].item() == pytest.approx(math.log(50 / sum(CIFAR10_LT_IF100)), rel=1e-6)


def test_vs_gradient_matches_the_official_code() -> None:
    logits, targets = reference_batch()
    logits.requires_grad_(True)
    build("vs")(logits, targets).backward()
    assert logits.grad is not None
    assert logits.grad[5].tolist() == pytest.approx(VS_GRAD_ROW_5, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("params", "expected", "regulariser"), LADE_REFERENCE)
def test_lade_matches_the_official_code(params: dict[str, Any], expected: float, regulariser: float) -> None:
    logits, targets = reference_batch()
    assert float(build("lade", params)(logits, targets)) == pytest.approx(expected, rel=REL)
    # The total is LADE-CE (PriorCELoss) plus alpha times the regulariser (LADELoss).
    alpha = params.get("alpha", 0.1)
    assert expected == pytest.approx(PRIOR_CE_REFERENCE + alpha * regulariser, rel=1e-12)
    alone = build("lade", {**params, "alpha": 1.0})(logits, targets) - build("lade", {**params, "alpha": 0.0})(
        logits, targets
    )
    assert float(alone) == pytest.approx(regulariser, rel=1e-6)


def test_lade_with_alpha_zero_is_the_official_prior_ce() -> None:
    logits, targets = reference_batch()
    assert float(build("lade", {"alpha": 0.0})(logits, targets)) == pytest.approx(PRIOR_CE_REFERENCE, rel=REL)


def test_lade_gradient_matches_the_official_code() -> None:
    logits, targets = reference_batch()
    logits.requires_grad_(True)
    build("lade")(logits, targets).backward()
    assert logits.grad is not None
    assert logits.grad[0].tolist() == pytest.approx(LADE_GRAD_ROW_0, rel=1e-6, abs=1e-9)
    assert logits.grad[5].tolist() == pytest.approx(LADE_GRAD_ROW_5, rel=1e-6, abs=1e-9)


# ---- formulas and special cases ---------------------------------------------------------------------------


def test_vs_special_cases_are_cross_entropy_and_logit_adjustment() -> None:
    logits, targets = small_batch()
    plain = build("vs", {"gamma": 0.0, "tau": 0.0}, SMALL_CONTEXT)(logits, targets)
    assert torch.allclose(plain, F.cross_entropy(logits, targets))
    adjusted = build("vs", {"gamma": 0.0, "tau": 1.5}, SMALL_CONTEXT)(logits, targets)
    assert torch.allclose(adjusted, build("logit_adjusted", {"tau": 1.5}, SMALL_CONTEXT)(logits, targets))


def test_vs_by_hand() -> None:
    logits, targets = small_batch()
    gamma, tau = 0.5, 2.0
    delta = torch.tensor([(n / 50) ** gamma for n in COUNTS], dtype=torch.float64)
    iota = torch.tensor([tau * math.log(n / 75) for n in COUNTS], dtype=torch.float64)
    weights = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    per_sample = F.cross_entropy(logits * delta + iota, targets, weight=weights, reduction="none")
    loss = build("vs", {"gamma": gamma, "tau": tau, "class_weights": [0.2, 1.0, 3.0]}, SMALL_CONTEXT)
    # The official F.cross_entropy(weight=w): sum_i w_{y_i} l_i / sum_i w_{y_i}.
    assert torch.allclose(loss(logits, targets), per_sample.sum() / weights[targets].sum())
    assert loss.class_weights.double().tolist() == pytest.approx([0.2, 1.0, 3.0])


def lade_by_hand(
    logits: torch.Tensor, targets: torch.Tensor, counts: tuple[int, ...], alpha: float, remine_lambda: float
) -> torch.Tensor:
    """The paper's formula written class by class (a loop, unlike the loss), with the official epsilons."""
    n, num_classes = logits.shape
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    log_prior = torch.log(prior + 1e-9)
    prior_ce = F.cross_entropy(logits + log_prior, targets)
    regulariser = logits.new_zeros(())
    for c in range(num_classes):
        mine = targets == c
        first = logits[mine, c].sum() / max(int(mine.sum()), 1)  # 0 for a class absent from the batch
        second = torch.logsumexp(logits[:, c] - log_prior[c] + math.log(1 / num_classes + 1e-9), 0) - math.log(n)
        regulariser = regulariser - prior[c] * (first - second - remine_lambda * second**2)
    return prior_ce + alpha * regulariser


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lade_by_hand(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(7, 3, generator=generator, dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1, 1, 0, 0])  # class 2 absent
    loss = build("lade", {"alpha": 0.3, "remine_lambda": 0.2}, SMALL_CONTEXT)
    assert torch.allclose(loss(logits, targets), lade_by_hand(logits, targets, COUNTS, 0.3, 0.2))


def test_lade_accepts_an_empty_class_and_needs_some_samples() -> None:
    # As the official code: log(0 + 1e-9) is finite, and an empty class has weight pi_c = 0 in the regulariser.
    logits, targets = small_batch()
    loss = build("lade", {}, BuildContext(class_counts=(30, 10, 0)))
    assert torch.isfinite(loss(logits, targets))
    with pytest.raises(ContextError, match="loss 'lade'.*every class count is 0"):
        build("lade", {}, BuildContext(class_counts=(0, 0, 0)))


def test_vs_rejects_an_empty_class() -> None:
    with pytest.raises(ContextError, match="loss 'vs'.*class 2 has 0"):
        build("vs", {}, BuildContext(class_counts=(10, 3, 0)))


@pytest.mark.parametrize("name", ["vs", "lade"])
def test_they_need_class_counts(name: str) -> None:
    with pytest.raises(ContextError, match=f"loss '{name}'.*class_counts"):
        build(name, {}, BuildContext(num_classes=3))


# ---- the loss protocol ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_sample_weight_of_one_is_the_plain_loss_and_mixing_splits_it(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params, SMALL_CONTEXT)
    logits, targets = small_batch()
    plain = loss(logits, targets)
    assert plain.dim() == 0 and torch.isfinite(plain)
    assert torch.equal(loss(logits, targets, torch.ones(6, dtype=torch.float64)), plain)
    # The normaliser does not depend on the sample weights: the two halves of a mixed batch add up.
    w = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.3], dtype=torch.float64)
    assert torch.allclose(loss(logits, targets, w) + loss(logits, targets, 1 - w), plain)
    assert loss(logits, targets, torch.zeros(6, dtype=torch.float64)) == 0


def test_vs_sample_weight_scales_each_term() -> None:
    logits, targets = small_batch()
    w = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.3], dtype=torch.float64)
    loss = build("vs", {"class_weights": [0.2, 1.0, 3.0]}, SMALL_CONTEXT)
    delta = torch.tensor([(n / 50) ** 0.3 for n in COUNTS], dtype=torch.float64)
    iota = torch.tensor([math.log(n / 75) for n in COUNTS], dtype=torch.float64)
    weights = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    per_sample = F.cross_entropy(logits * delta + iota, targets, weight=weights, reduction="none")
    assert torch.allclose(loss(logits, targets, w), (w * per_sample).sum() / weights[targets].sum())


def test_lade_sample_weight_splits_the_regulariser_linearly() -> None:
    """Sample i carries its CE term, its share -pi_y z_iy / m_y of the label term and 1/N of the batch term."""
    logits, targets = small_batch(n=7)
    other = targets.flip(0)
    w = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.3, 0.9], dtype=torch.float64)
    alpha, remine_lambda, n = 0.5, 0.2, 7
    loss = build("lade", {"alpha": alpha, "remine_lambda": remine_lambda}, SMALL_CONTEXT)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    log_prior = torch.log(prior + 1e-9)
    second = torch.logsumexp(logits - log_prior + math.log(1 / 3 + 1e-9), 0) - math.log(n)
    batch_term = (prior * (second + remine_lambda * second**2)).sum()

    def labelled_part(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        prior_ce = F.cross_entropy(logits + log_prior, labels, reduction="none")
        batch_counts = torch.bincount(labels, minlength=3).double()
        label_share = prior[labels] * logits[torch.arange(n), labels] / batch_counts[labels]
        return (weight * prior_ce).sum() / n - alpha * (weight * label_share).sum()

    expected = labelled_part(targets, w) + alpha * w.sum() / n * batch_term
    assert torch.allclose(loss(logits, targets, w), expected)
    # A mixed batch (two label sets over the same logits) counts the label-free batch term exactly once.
    mixed = loss(logits, targets, w) + loss(logits, other, 1 - w)
    assert torch.allclose(mixed, labelled_part(targets, w) + labelled_part(other, 1 - w) + alpha * batch_term)


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_gradients_are_correct(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params, SMALL_CONTEXT)
    logits, targets = small_batch(n=5)
    logits.requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 0.25, 1.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: loss(z, targets, w), (logits,))


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_half_precision_logits_give_a_float32_loss(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params, SMALL_CONTEXT)
    logits, targets = small_batch()
    value = loss(logits.to(torch.bfloat16), targets)
    assert value.dtype == torch.float32
    assert torch.isclose(value.double(), loss(logits, targets), atol=0.05)


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_they_run_under_vmap_over_stacked_runs(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params, SMALL_CONTEXT)
    logits = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.stack([torch.arange(6) % 3, torch.tensor([2, 2, 1, 0, 0, 0])])
    w = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
    fused = torch.func.vmap(lambda z, y: loss(z, y, w))(logits, targets)
    assert torch.allclose(fused, torch.stack([loss(z, y, w) for z, y in zip(logits, targets, strict=True)]))


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_they_are_pure_functions_of_their_tensors(name: str, params: dict[str, Any]) -> None:
    """Safe to replay from a CUDA graph, unless asked to check every target (a host read per call);
    nothing derived from the context is saved in a checkpoint."""
    loss = build(name, params, SMALL_CONTEXT)
    assert loss.cuda_graph_safe is True
    assert build(name, {**params, "check_targets": True}, SMALL_CONTEXT).cuda_graph_safe is False
    assert loss.state_dict() == {}
    assert (loss.class_weights is None) == ("class_weights" not in params)


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_bad_inputs_are_named(name: str, params: dict[str, Any]) -> None:
    loss = build(name, params, SMALL_CONTEXT)
    logits, targets = small_batch(n=3)
    with pytest.raises(DataError, match=rf"loss '{name}': targets\[1\] = 3 is not a class index in \[0, 3\)"):
        loss(logits, torch.tensor([0, 3, 1]))
    with pytest.raises(DataError, match="built for 3 classes but got logits with 5 columns"):
        loss(torch.randn(3, 5, dtype=torch.float64), targets)
    with pytest.raises(DataError, match="sample_weight of shape"):
        loss(logits, targets, torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_they_run_on_cuda_without_host_syncs(name: str, params: dict[str, Any]) -> None:
    logits, targets = small_batch()
    on_cpu = build(name, params, SMALL_CONTEXT)(logits, targets)
    loss = build(name, params, BuildContext(num_classes=3, class_counts=COUNTS, device="cuda"))
    z, y = logits.cuda().requires_grad_(True), targets.cuda()
    w = torch.rand(6, device="cuda", dtype=torch.float64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss(z, y)
        (loss(z, y, w) + loss(z, y.flip(0), 1 - w)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert value.is_cuda and torch.allclose(value.cpu(), on_cpu)


# ---- params and listing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("vs", {"gamma": -0.1}, "gamma"),
        ("vs", {"tau": -1.0}, "tau"),
        ("vs", {"gamma": float("nan")}, "gamma"),
        ("vs", {"gama": 0.2}, "gama"),
        ("vs", {"class_weights": {"name": "effective_number", "beta": 1.0}}, "beta"),
        ("lade", {"alpha": -0.1}, "alpha"),
        ("lade", {"remine_lambda": -0.01}, "remine_lambda"),
        ("lade", {"alpha": True}, "alpha"),
        ("lade", {"remine_lambda": float("inf")}, "remine_lambda"),
        ("lade", {"lambda": 0.1}, "lambda"),
    ],
)
def test_bad_params_are_refused_with_their_name(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ibcore.ConfigError, match=field):
        build(name, params)


def test_defaults_are_the_official_ones() -> None:
    vs = build("vs")
    assert (vs.gamma, vs.tau) == (0.3, 1.0)
    lade = build("lade")
    assert (lade.alpha, lade.remine_lambda) == (0.1, 0.1)


def test_they_are_listed_with_their_papers(ib_cli: Callable[..., Any]) -> None:
    infos = {info.name: info for info in ibcore.list_components("loss")}
    assert infos["vs"].citation is not None and "Kini et al., NeurIPS 2021" in infos["vs"].citation
    assert infos["lade"].citation is not None and "Hong et al., CVPR 2021" in infos["lade"].citation
    assert infos["vs"].provider == infos["cross_entropy"].provider == infos["lade"].provider
    result = ib_cli("list", "losses")
    assert result.rc == 0
    assert "Vector-Scaling loss" in result.line_with("vs ")
    assert "LADE" in result.line_with("lade ")
