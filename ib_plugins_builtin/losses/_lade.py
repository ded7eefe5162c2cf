"""The LADE loss module (imported lazily by ``lade.build_lade``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ib_plugins_builtin.losses._base import ClassificationLoss, as_buffer, one_hot_like


class LADELoss(ClassificationLoss):
    """LADE-CE plus alpha times the LADE regulariser, both on the same logits z (N, C).

    With pi the training priors, m_c the number of samples of class c in the batch and
    B_c = log(1/N sum_i exp(z_ic) (1/C) / pi_c), the per-class ReMINE estimate is
    E_c = (1/m_c) sum_{i: y_i = c} z_ic - B_c - lambda B_c^2, and

        loss = mean_i CE(z_i + log pi, y_i) - alpha sum_c pi_c E_c

    summed over all C classes as the official ``LADELoss`` does (an absent class adds its B terms
    only). The regulariser is not a sum over samples; to keep the house rule for ``sample_weight``
    (linear in it, normaliser N, ``w == 1`` exact) sample i carries the share
    -pi_{y_i} z_{i,y_i} / m_{y_i} of the first terms (m_c is not weighted) and 1/N of the
    label-free sum_c pi_c (B_c + lambda B_c^2). A mixed batch's two halves thus add up to the
    batch term once and each half's label term weighted by its mixing weight.
    """

    prior: Tensor
    log_prior: Tensor

    def __init__(
        self,
        prior: Sequence[float],
        log_prior: Sequence[float],
        log_uniform: float,
        *,
        alpha: float,
        remine_lambda: float,
        check_targets: bool | None,
        device: torch.device,
    ) -> None:
        super().__init__("lade", len(prior), None, check_targets=check_targets, device=device)
        self.register_buffer("prior", as_buffer(prior, device), persistent=False)
        self.register_buffer("log_prior", as_buffer(log_prior, device), persistent=False)
        self.log_uniform = log_uniform
        self.alpha = alpha
        self.remine_lambda = remine_lambda

    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        n = logits.shape[0]
        log_prior = self.log_prior.to(device=logits.device, dtype=logits.dtype)
        prior_ce = F.cross_entropy(logits + log_prior, targets, reduction="none")
        if self.alpha == 0 or n == 0:
            return prior_ce, n
        prior = self.prior.to(device=logits.device, dtype=logits.dtype)
        # B_c over the whole batch (labels play no part), then the batch term sum_c pi_c (B_c + lambda B_c^2).
        second = torch.logsumexp(logits - log_prior + self.log_uniform, dim=0) - math.log(n)
        batch_term = (prior * (second + self.remine_lambda * second * second)).sum()
        # Sample i's share of -sum_c pi_c (1/m_c) sum_{y_j = c} z_jc; m_{y_i} >= 1, so no 0/0.
        batch_counts = one_hot_like(logits, targets).sum(dim=0)
        true_logit = logits.gather(1, targets[:, None]).squeeze(1)
        first_share = prior[targets] / batch_counts[targets] * true_logit
        return prior_ce + self.alpha * (batch_term - n * first_share), n

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, remine_lambda={self.remine_lambda}"
