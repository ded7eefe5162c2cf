"""Post-hoc adjustments: tau-normalised classifier (Kang et al.) and post-hoc logit adjustment (Menon et al.)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ibcore
from ibcore import BuildContext, ContextError, ProtocolError


class TinyModel(nn.Module):
    """features -> nn.Linear classifier, with the hand-picked weights the numbers below use."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # row norms 5 and 2
            self.classifier.bias.copy_(torch.tensor([10.0, -10.0]))


class NormedLinear(nn.Module):
    """LDAM-DRW's cosine classifier: weight of shape (D, C), logits = normalize(x) @ normalize(W, dim=0)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def adjustment(name: str, params: dict[str, Any], context: BuildContext | None = None) -> Any:
    return ibcore.build("adjustment", name, params, context=context or BuildContext())


FEATURES = torch.tensor([[1.0, 1.0], [2.0, -1.0]])


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        # rows / norm^tau, bias dropped (official tau_norm.py): W x with x = (1, 1) and (2, -1).
        (1.0, [[0.6 + 0.8, 1.0], [1.2 - 0.8, -1.0]]),
        (0.0, [[7.0, 2.0], [2.0, -2.0]]),
        (0.5, [[7 / math.sqrt(5), 2 / math.sqrt(2)], [2 / math.sqrt(5), -2 / math.sqrt(2)]]),
    ],
)
def test_tau_norm_by_hand(tau: float, expected: list[list[float]]) -> None:
    model = TinyModel()
    adjusted = adjustment("tau_norm", {"tau": tau})(model, FEATURES, model.classifier(FEATURES))
    assert torch.allclose(adjusted, torch.tensor(expected), atol=1e-6)


def test_tau_norm_leaves_the_model_unchanged() -> None:
    model = TinyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adjustment("tau_norm", {})(model, FEATURES, model.classifier(FEATURES))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tau_norm_looks_through_a_data_parallel_wrapper() -> None:
    wrapper = nn.Module()
    wrapper.module = TinyModel()
    adjusted = adjustment("tau_norm", {"tau": 1.0})(wrapper, FEATURES[:1], torch.zeros(1, 2))
    assert torch.allclose(adjusted, torch.tensor([[1.4, 1.0]]))


def test_tau_norm_changes_nothing_for_a_cosine_classifier() -> None:
    model = nn.Module()
    model.classifier = NormedLinear(4, 3)  # (D, C) = (4, 3) weight
    features = torch.randn(5, 4)
    logits = model.classifier(features)
    adjusted = adjustment("tau_norm", {"tau": 1.0})(model, features, logits)
    assert torch.allclose(adjusted, logits, atol=1e-6)


def test_tau_norm_needs_a_classifier_with_weights() -> None:
    with pytest.raises(ProtocolError, match="model.classifier"):
        adjustment("tau_norm", {})(nn.Module(), FEATURES, torch.zeros(2, 2))
    model = nn.Module()
    model.classifier = nn.Linear(2, 4)
    with pytest.raises(ProtocolError, match="no axis of size 3"):
        adjustment("tau_norm", {})(model, FEATURES, torch.zeros(2, 3))


def test_posthoc_logit_adjustment_by_hand() -> None:
    context = BuildContext(num_classes=2, class_counts=(3, 1))
    logits = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    adjusted = adjustment("posthoc_logit_adjustment", {}, context)(None, None, logits)
    # pi = (0.75, 0.25): logits - log(pi) (Menon et al., eq. 9 with tau = 1).
    expected = logits - torch.tensor([math.log(0.75), math.log(0.25)])
    assert torch.allclose(adjusted, expected)
    assert adjusted.argmax(dim=1).tolist() == [1, 1]  # 2 - log .75 = 2.29 < 1 - log .25 = 2.39
    half = adjustment("posthoc_logit_adjustment", {"tau": 0.5}, context)(None, None, logits)
    assert torch.allclose(half, logits - 0.5 * torch.tensor([math.log(0.75), math.log(0.25)]))
    unchanged = adjustment("posthoc_logit_adjustment", {"tau": 0.0}, context)(None, None, logits)
    assert torch.allclose(unchanged, logits)


def test_posthoc_adjustment_undoes_the_logit_adjusted_loss_shift() -> None:
    # The loss trains softmax(z + tau log pi); post-hoc adjustment predicts from z - tau log pi: same offset.
    context = BuildContext(num_classes=3, class_counts=(50, 20, 5))
    loss = ibcore.build("loss", "logit_adjusted", {"tau": 1.5}, context=context)
    posthoc = adjustment("posthoc_logit_adjustment", {"tau": 1.5}, context)
    zeros = torch.zeros(1, 3)
    assert torch.allclose(posthoc(None, None, zeros), -loss.shift)


def test_posthoc_logit_adjustment_needs_counts_and_matching_logits() -> None:
    with pytest.raises(ContextError, match="posthoc_logit_adjustment.*class_counts"):
        adjustment("posthoc_logit_adjustment", {})
    built = adjustment("posthoc_logit_adjustment", {}, BuildContext(class_counts=(3, 1)))
    with pytest.raises(ibcore.DataError, match="built for 2 classes"):
        built(None, None, torch.zeros(1, 3))


def test_negative_tau_is_rejected() -> None:
    with pytest.raises(ibcore.ConfigError, match="tau"):
        adjustment("tau_norm", {"tau": -1.0})


def test_importing_the_adjustments_does_not_import_torch() -> None:
    code = "import sys, ib_plugins_builtin.adjustments; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adjustments_run_on_cuda() -> None:
    model = TinyModel().cuda()
    features = FEATURES.cuda()
    tau_norm = adjustment("tau_norm", {"tau": 1.0})(model, features, model.classifier(features))
    assert tau_norm.is_cuda and torch.allclose(tau_norm.cpu(), torch.tensor([[1.4, 1.0], [0.4, -1.0]]))
    posthoc = adjustment("posthoc_logit_adjustment", {}, BuildContext(class_counts=(3, 1)))
    assert posthoc(model, features, torch.zeros(2, 2, device="cuda")).is_cuda
