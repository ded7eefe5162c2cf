"""Batch mixers: one lambda and one pairing per batch, shared by the inputs (or activations) and the targets.

``plan`` draws everything a batch needs from the trainer's ``torch.Generator`` only: one 63-bit
seed is taken from it and feeds a NumPy generator for lambda (NumPy has a seeded Beta sampler,
torch's Beta takes no generator), the partner permutation and the CutMix box. With a CPU
generator, planning and mixing never make the host wait for a CUDA device. ``mix`` applies a plan to any tensor whose
first dimension is the batch, so manifold mixup uses it on hidden activations. The trainer's
loss is ``loss(z, y, w) + loss(z, y[plan.permutation], 1 - w)`` with ``w = plan.target_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ibcore import ConfigError, ConfigIssue, DataError, MixPlan

_SEED_BOUND = 2**63 - 1


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded by one draw from ``generator`` (advancing it by exactly one draw)."""
    seed = torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=generator.device)
    return np.random.default_rng(int(seed.item()))


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device`` without making the host wait for a CUDA device.

    A copy from pageable memory blocks until the device is idle; a non-blocking copy from pinned
    memory does not (PyTorch's pinned-memory cache keeps the buffer until the copy has run).
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def identity_plan(batch_size: int, device: torch.device) -> MixPlan:
    """A plan that leaves the batch unchanged: every sample paired with itself, lambda = 1."""
    return MixPlan(
        permutation=torch.arange(batch_size, device=device),
        lam=1.0,
        target_weight=torch.ones(batch_size, device=device),
        layer=0,
        box=None,
    )


class BatchMixer:
    """Mixup family base: Beta(alpha, alpha) lambda, a random pairing, on a ``prob`` fraction of batches.

    ``active(epoch)`` is False from epoch ``disable_from_epoch`` on (0-based), which implements
    "fine-tuning without mixup" for the last epochs. ``mixes_hidden`` says whether a plan may mix
    hidden activations (informative: the engine reads each plan's ``layer``).
    """

    mixes_hidden: bool = False
    # mix() is the standard blend (or CutMix's box paste) of its plan: the fused step may replay it in a CUDA graph.
    standard_mix: bool = True

    def __init__(self, alpha: float, prob: float = 1.0, disable_from_epoch: int | None = None) -> None:
        self.alpha = alpha
        self.prob = prob
        self.disable_from_epoch = disable_from_epoch

    def active(self, epoch: int) -> bool:
        return self.disable_from_epoch is None or epoch < self.disable_from_epoch

    def plan(self, x: Tensor, targets: Tensor, generator: torch.Generator) -> MixPlan:
        batch_size = x.shape[0]
        self._check_batch(x, targets)
        rng = numpy_rng(generator)
        # Drawn only when needed, so prob=1 plans do not depend on this extra draw.
        if self.prob < 1.0 and rng.random() >= self.prob:
            return identity_plan(batch_size, x.device)
        lam = float(rng.beta(self.alpha, self.alpha))
        permutation = to_device(torch.from_numpy(rng.permutation(batch_size)), x.device)
        return self._complete_plan(x, targets, rng, permutation, lam)

    def _check_batch(self, x: Tensor, targets: Tensor) -> None:
        if targets.shape[:1] != x.shape[:1]:
            raise DataError(
                f"{type(self).__name__}: a batch of {x.shape[0]} inputs came with {targets.shape[0]} targets"
            )

    def _complete_plan(
        self, x: Tensor, targets: Tensor, rng: np.random.Generator, permutation: Tensor, lam: float
    ) -> MixPlan:
        """The plan once lambda and the pairing are drawn (subclasses add a layer, a box, label weights)."""
        return MixPlan(
            permutation=permutation,
            lam=lam,
            target_weight=torch.full((x.shape[0],), lam, device=x.device),
            layer=0,
        )

    def mix(self, x: Tensor, plan: MixPlan) -> Tensor:
        """``lam * x + (1 - lam) * x[permutation]`` (inputs, or hidden activations for manifold mixup)."""
        if plan.lam == 1.0:
            return x
        return plan.lam * x + (1.0 - plan.lam) * x[plan.permutation]


class InputMixup(BatchMixer):
    """mixup (Zhang et al., ICLR 2018): convex combinations of input pairs and of their labels."""


class ManifoldMixup(BatchMixer):
    """Manifold mixup (Verma et al., ICML 2019): mixup at a layer drawn per batch from ``layers``.

    Layer 0 is the input, layer ``k`` the output of the backbone's stage ``k``; the trainer runs
    ``backbone.forward_mixed(x, plan.layer, lambda h: mixer.mix(h, plan))``.
    """

    def __init__(
        self, alpha: float, layers: Sequence[int], prob: float = 1.0, disable_from_epoch: int | None = None
    ) -> None:
        super().__init__(alpha, prob, disable_from_epoch)
        self.layers = tuple(layers)
        self.mixes_hidden = any(layer > 0 for layer in self.layers)

    def _complete_plan(
        self, x: Tensor, targets: Tensor, rng: np.random.Generator, permutation: Tensor, lam: float
    ) -> MixPlan:
        plan = super()._complete_plan(x, targets, rng, permutation, lam)
        plan.layer = int(self.layers[int(rng.integers(len(self.layers)))])
        return plan


class CutMix(BatchMixer):
    """CutMix (Yun et al., ICCV 2019): paste a box from the partner image; lambda = kept area fraction.

    As the official code does: the box has sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))``
    around a uniform centre, is clipped to the image, and lambda is recomputed from the clipped
    area, so the label weight equals the fraction of the image that is the sample's own.
    """

    def _check_batch(self, x: Tensor, targets: Tensor) -> None:
        super()._check_batch(x, targets)
        if x.dim() != 4:
            raise DataError(f"CutMix needs image batches (N, C, H, W); this data set gives {tuple(x.shape)}")

    def _complete_plan(
        self, x: Tensor, targets: Tensor, rng: np.random.Generator, permutation: Tensor, lam: float
    ) -> MixPlan:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        box = cutmix_box(height, width, lam, rng)
        top, bottom, left, right = box
        kept_lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return MixPlan(
            permutation=permutation,
            lam=kept_lam,
            target_weight=torch.full((x.shape[0],), kept_lam, device=x.device),
            layer=0,
            box=box,
        )

    def mix(self, x: Tensor, plan: MixPlan) -> Tensor:
        """``x`` with the plan's box replaced by the partner's pixels (a new tensor)."""
        if plan.box is None:
            return x
        top, bottom, left, right = plan.box
        if bottom <= top or right <= left:
            return x
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[plan.permutation, :, top:bottom, left:right]
        return mixed


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (top, bottom, left, right) covering about ``1 - lam`` of an ``height x width`` image."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
    top = min(max(centre_y - cut_height // 2, 0), height)
    bottom = min(max(centre_y + cut_height // 2, 0), height)
    left = min(max(centre_x - cut_width // 2, 0), width)
    right = min(max(centre_x + cut_width // 2, 0), width)
    return top, bottom, left, right


class Remix(BatchMixer):
    """Remix (Chou et al., ECCV Workshops 2020): mixup inputs, labels pushed towards the minority class.

    For sample ``i`` (class count ``n_i``) mixed with weight ``lam`` and partner ``j`` (``n_j``),
    the weight of label ``y_i`` is 0 if ``n_i / n_j >= kappa`` and ``lam < tau`` (a majority sample
    that is mostly the minority partner takes the partner's label), 1 if ``n_i / n_j <= 1 / kappa``
    and ``1 - lam < tau`` (a minority sample that dominates keeps its own label), else ``lam``.
    """

    def __init__(
        self,
        alpha: float,
        class_counts: Sequence[int],
        kappa: float = 3.0,
        tau: float = 0.5,
        prob: float = 1.0,
        disable_from_epoch: int | None = None,
    ) -> None:
        super().__init__(alpha, prob, disable_from_epoch)
        self.class_counts = tuple(int(count) for count in class_counts)
        self.kappa = kappa
        self.tau = tau
        self._counts_by_device: dict[torch.device, Tensor] = {}

    def _counts_on(self, device: torch.device) -> Tensor:
        counts = self._counts_by_device.get(device)
        if counts is None:
            counts = torch.tensor(self.class_counts, dtype=torch.float32, device=device)
            self._counts_by_device[device] = counts
        return counts

    def _complete_plan(
        self, x: Tensor, targets: Tensor, rng: np.random.Generator, permutation: Tensor, lam: float
    ) -> MixPlan:
        return MixPlan(
            permutation=permutation,
            lam=lam,
            target_weight=self.label_weights(targets, permutation, lam),
            layer=0,
        )

    def label_weights(self, targets: Tensor, permutation: Tensor, lam: float) -> Tensor:
        """Remix's per-sample weight of each sample's own label (no host sync)."""
        counts = self._counts_on(targets.device)
        own = counts[targets]
        partner = counts[targets[permutation]]
        ratio = own / partner
        weights = torch.full(own.shape, lam, device=targets.device)
        if lam < self.tau:
            weights = torch.where(ratio >= self.kappa, torch.zeros_like(weights), weights)
        if 1.0 - lam < self.tau:
            weights = torch.where(ratio <= 1.0 / self.kappa, torch.ones_like(weights), weights)
        return weights


def disable_from_epoch(component: str, disable_last_epochs: int, epochs: int) -> int:
    """The first epoch (0-based) without mixing when the last ``disable_last_epochs`` of ``epochs`` mix nothing."""
    if disable_last_epochs > epochs:
        raise ConfigError(
            [
                ConfigIssue(
                    "params.disable_last_epochs",
                    f"{component}: disable_last_epochs={disable_last_epochs} exceeds the run's {epochs} epochs",
                )
            ]
        )
    return epochs - disable_last_epochs
