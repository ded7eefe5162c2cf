"""Post-hoc adjustments of a trained model's logits: tau-normalised classifier, logit adjustment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ibcore import DataError, ProtocolError


def _classifier_of(model: Any) -> tuple[nn.Module, Tensor]:
    """``model.classifier`` and its weight, looking through a DDP/DataParallel ``.module`` wrapper."""
    for candidate in (model, getattr(model, "module", None)):
        classifier = getattr(candidate, "classifier", None)
        weight = getattr(classifier, "weight", None)
        if isinstance(classifier, nn.Module) and isinstance(weight, Tensor):
            return classifier, weight
    raise ProtocolError(
        "adjustment 'tau_norm' needs model.classifier, a torch module with a .weight tensor "
        f"(an nn.Linear or a normed linear); {type(model).__name__} has none."
    )


class TauNorm:
    """Kang et al.'s tau-normalised classifier: logits = features @ (W_c / ||W_c||^tau)^T, bias dropped.

    Follows the official ``tau_norm.py`` of facebookresearch/classifier-balancing: each class's weight
    vector is divided by its L2 norm to the power tau and the logits are recomputed from the features
    with a dot product; the stage-1 bias is loaded there but not used. The classifier module itself
    computes the logits (``functional_call`` with the normalised weight and a zero bias), so an
    ``nn.Linear`` (C, D) weight and a normed linear with a (D, C) weight both work; for a cosine
    classifier, which normalises its weights itself, tau-normalisation changes nothing.
    """

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def __call__(self, model: Any, features: Tensor, logits: Tensor) -> Tensor:
        classifier, weight = _classifier_of(model)
        weight = weight.detach()
        num_classes = logits.shape[-1]
        if weight.dim() != 2 or num_classes not in weight.shape:
            raise ProtocolError(
                f"adjustment 'tau_norm': classifier weight of shape {tuple(weight.shape)} has no axis of size "
                f"{num_classes}, the number of logit columns."
            )
        class_axis = 0 if weight.shape[0] == num_classes else 1  # nn.Linear is (C, D); LDAM's NormedLinear (D, C)
        norms = weight.norm(p=2, dim=1 - class_axis, keepdim=True)
        # A zero row stays zero (0 / tiny) instead of turning into NaN.
        normalised = weight / norms.clamp_min(torch.finfo(weight.dtype).tiny) ** self.tau
        replaced = {"weight": normalised}
        bias = getattr(classifier, "bias", None)
        if isinstance(bias, Tensor):
            replaced["bias"] = torch.zeros_like(bias)
        with torch.no_grad():
            return functional_call(classifier, replaced, (features,))

    def __repr__(self) -> str:
        return f"TauNorm(tau={self.tau})"


class PosthocLogitAdjustment:
    """Menon et al.'s post-hoc logit adjustment: logits - log(pi^tau + 1e-12), pi the training priors."""

    def __init__(self, log_prior: Sequence[float], tau: float) -> None:
        self.tau = tau
        self.log_prior = torch.tensor(list(log_prior), dtype=torch.float64).float()

    def __call__(self, model: Any, features: Tensor, logits: Tensor) -> Tensor:
        if logits.dim() < 1 or logits.shape[-1] != self.log_prior.shape[0]:
            raise DataError(
                f"adjustment 'posthoc_logit_adjustment' was built for {self.log_prior.shape[0]} classes but got "
                f"logits of shape {tuple(logits.shape)}."
            )
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # a half-precision prior would round the tail classes' offsets
        return logits - self.log_prior.to(device=logits.device, dtype=logits.dtype)

    def __repr__(self) -> str:
        return f"PosthocLogitAdjustment(tau={self.tau}, num_classes={self.log_prior.shape[0]})"
