"""The Poly-1 loss (Leng et al., ICLR 2022): ``CE + ε(1 - p_t)`` per sample, averaged over the batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibcore import DataError


class Poly1Loss(nn.Module):
    """``loss(logits, targets, sample_weight=None) -> scalar``, ibcore's loss protocol.

    ``sample_weight`` (N,) multiplies each sample's term; the divisor is always the batch size N, so
    a mixed batch's loss is ``loss(z, y_a, w) + loss(z, y_b, 1 - w)``.
    """

    def __init__(self, epsilon: float, num_classes: int | None = None) -> None:
        super().__init__()
        self.epsilon = float(epsilon)
        self.num_classes = num_classes

    def forward(self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        if logits.dim() != 2 or targets.shape != (logits.shape[0],):
            raise DataError(
                f"loss 'poly1' expects logits (N, C) and targets (N,); got {tuple(logits.shape)} and "
                f"{tuple(targets.shape)}."
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise DataError(
                f"loss 'poly1' was built for {self.num_classes} classes but got {logits.shape[1]} logit columns."
            )
        # log p_t from log_softmax: exact for large logits, and p_t = exp(log p_t) shares its rounding.
        log_pt = torch.log_softmax(logits.float(), dim=1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
        terms = -log_pt + self.epsilon * (1.0 - log_pt.exp())
        if sample_weight is not None:
            if sample_weight.shape != terms.shape:
                expected, got = (terms.shape[0],), tuple(sample_weight.shape)
                raise DataError(f"loss 'poly1' expects sample_weight of shape {expected}; got {got}.")
            terms = terms * sample_weight.to(device=terms.device, dtype=terms.dtype)
        return terms.sum() / logits.shape[0]
