"""What every built-in loss shares: input checks, the sample-weight reduction, and buffers on the right device.

Each loss computes a per-sample term ``l_i`` and a normaliser ``D`` (the batch size N, or the sum of the
true classes' weights for PyTorch's weighted mean); the result is ``sum_i(s_i * l_i) / D`` with
``s_i`` the optional ``sample_weight``, and 0 when ``D`` is 0 (every true class has weight 0). ``D``
never depends on ``sample_weight``, so a mixed batch's loss is ``loss(z, y_a, w) + loss(z, y_b, 1 - w)``
and ``w == 1`` gives the plain loss exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ibcore import BuildContext, DataError


def buffer_device(context: BuildContext) -> torch.device:
    """The context's device when this process can allocate on it, else the CPU.

    Buffers start where the logits will be, so a step needs no copy; ``forward`` still moves them
    if the loss is used elsewhere (``loss.to(device)`` makes that free again).
    """
    try:
        device = torch.device(context.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, TypeError, AssertionError):  # "auto", or CUDA not available here
        return torch.device("cpu")
    return device


def as_buffer(values: Sequence[float] | None, device: torch.device) -> Tensor | None:
    """A float32 tensor of per-class values (computed in float64 by the caller), or ``None``."""
    if values is None:
        return None
    return torch.tensor(list(values), dtype=torch.float64).to(device=device, dtype=torch.float32)


def one_hot_like(logits: Tensor, targets: Tensor) -> Tensor:
    """One-hot targets in the logits' dtype and device.

    A scatter rather than ``F.one_hot``, whose data-dependent range check cannot run under
    ``torch.func.vmap`` (the fused path) and may read the targets back to the host.
    """
    return torch.zeros_like(logits).scatter(1, targets[:, None], 1.0)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if callable(is_compiling) else False


def _inside_functorch(tensor: Tensor) -> bool:
    """True for a tensor wrapped by torch.func (vmap/grad), whose values cannot steer Python control flow."""
    functorch = getattr(torch._C, "_functorch", None)
    is_wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(tensor)) if callable(is_wrapped) else False


def _divide_or_zero(total: Tensor, normaliser: Tensor) -> Tensor:
    """total / normaliser, or 0 (with a gradient of 0) where the normaliser is 0.

    A weighted mean over sum_i w_{y_i} is 0/0 for a batch whose classes all have weight 0: no sample
    counts, so the loss is 0 instead of NaN. ``torch.where`` rather than an ``if``, so no value is read
    back to the host and the fused (vmapped) and compiled paths still work; the divisor is made 1
    there so the unused branch has no NaN gradient either.
    """
    nonzero = normaliser != 0
    safe = torch.where(nonzero, normaliser, torch.ones_like(normaliser))
    return torch.where(nonzero, total / safe, torch.zeros_like(total))


class ClassificationLoss(nn.Module):
    """Base of the built-in losses: ``loss(logits, targets, sample_weight=None) -> scalar``.

    ``check_targets`` controls the range check of the targets, which reads their values: ``None``
    (default) checks only tensors on the CPU, where that costs no device synchronisation; ``True``
    always checks (a host sync per call on CUDA); ``False`` never does. Shape checks are always done.
    ``class_weights`` is the (C,) float32 weight tensor, or ``None`` for an unweighted loss.
    """

    class_weights: Tensor | None

    def __init__(
        self,
        name: str,
        num_classes: int | None,
        class_weights: Sequence[float] | None = None,
        *,
        check_targets: bool | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.check_targets = check_targets
        # Derived from params and context only: not persistent, so checkpoints do not carry it.
        self.register_buffer("class_weights", as_buffer(class_weights, device or torch.device("cpu")), persistent=False)

    @property
    def cuda_graph_safe(self) -> bool:
        """A pure function of its tensors, so a CUDA graph may replay it (docs/running.md), unless
        ``check_targets=True`` reads the targets back to the host on every call."""
        return self.check_targets is not True

    # ---- to override -------------------------------------------------------------------------
    def per_sample(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        """Per-sample terms (N,) and the normaliser (a tensor, or the batch size as an int)."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def forward(self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        self._check_inputs(logits, targets, sample_weight)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # as autocast does for cross-entropy: half-precision log-probs are too coarse
        terms, normaliser = self.per_sample(logits, targets)
        if sample_weight is not None:
            terms = terms * sample_weight.to(dtype=terms.dtype)
        if isinstance(normaliser, int):
            return terms.sum() / normaliser
        return _divide_or_zero(terms.sum(), normaliser)

    def weight_of(self, targets: Tensor, like: Tensor) -> Tensor | None:
        """The true classes' weights w_{y_i} (N,), on ``like``'s device and dtype; ``None`` if unweighted."""
        if self.class_weights is None:
            return None
        return self.class_weights.to(device=like.device, dtype=like.dtype)[targets]

    def weights_on(self, like: Tensor) -> Tensor | None:
        """The (C,) class weights on ``like``'s device and dtype, or ``None``."""
        if self.class_weights is None:
            return None
        return self.class_weights.to(device=like.device, dtype=like.dtype)

    def _check_inputs(self, logits: Tensor, targets: Tensor, sample_weight: Tensor | None) -> None:
        where = f"loss {self.name!r}"
        if logits.dim() != 2:
            raise DataError(f"{where} expects logits of shape (N, C); got shape {tuple(logits.shape)}.")
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise DataError(
                f"{where} expects targets of shape (N,) = ({logits.shape[0]},) as class indices, matching the "
                f"logits {tuple(logits.shape)}; got shape {tuple(targets.shape)}."
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise DataError(f"{where} expects integer class indices as targets; got a {targets.dtype} tensor.")
        num_classes = logits.shape[1]
        if self.num_classes is not None and num_classes != self.num_classes:
            raise DataError(
                f"{where} was built for {self.num_classes} classes but got logits with {num_classes} columns; "
                "does the backbone's num_classes match the data set?"
            )
        if sample_weight is not None and tuple(sample_weight.shape) != (logits.shape[0],):
            raise DataError(
                f"{where} expects sample_weight of shape (N,) = ({logits.shape[0]},); "
                f"got shape {tuple(sample_weight.shape)}."
            )
        if self._should_check_values(targets):
            bad = (targets < 0) | (targets >= num_classes)
            if bool(bad.any()):
                index = int(bad.nonzero()[0, 0])
                raise DataError(
                    f"{where}: targets[{index}] = {int(targets[index])} is not a class index in [0, {num_classes})."
                )

    def _should_check_values(self, targets: Tensor) -> bool:
        if targets.numel() == 0 or _compiling() or _inside_functorch(targets):
            return False  # the check would break a compiled graph or a vmapped (fused) step
        if self.check_targets is None:
            return targets.device.type == "cpu"
        return self.check_targets

    def extra_repr(self) -> str:
        weighted = "weighted" if self.class_weights is not None else "unweighted"
        return f"name={self.name!r}, num_classes={self.num_classes}, {weighted}"
