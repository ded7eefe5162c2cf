"""Augmentation policies on the device: after the dataset's own crop and flip, before (or, for a policy that
says ``normalised``, after) normalisation, each sample with its own draws.

Runs of one batch stream share the crop and flip; runs with equal policies share the policy's draws and the
augmented tensor, so they still train on one batch (and stack on the fused path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ibcore.engine.batches import normalise
from ibcore.protocols import Augmentation, AugmentSpec

STANDARD = "standard"  # the key of the dataset's own augmentation only


def policy_parts(policy: Augmentation | None) -> list[Augmentation]:
    """The policies ``policy`` applies, in order (a ``compose`` flattened; ``standard`` none)."""
    if policy is None or getattr(policy, "identity", False):
        return []
    parts = getattr(policy, "parts", None)
    if parts is None:
        return [policy]
    return [part for sub in parts for part in policy_parts(sub)]


def order_problem(parts: Sequence[Augmentation]) -> str | None:
    """Why ``parts`` cannot be applied in this order (a pixel policy after a normalised one), or None."""
    seen_normalised = False
    for part in parts:
        normalised = bool(getattr(part, "normalised", False))
        if seen_normalised and not normalised:
            return (
                f"{type(part).__name__} works on pixels but comes after a policy that works on the normalised "
                "batch (such as cutout): put the pixel policies first"
            )
        seen_normalised = seen_normalised or normalised
    return None


def augment_pixels(
    pixels: Tensor,
    spec: AugmentSpec,
    policy: Augmentation | None,
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """Cropped and flipped pixel values (float 0..255) → the normalised batch with ``policy`` applied.

    Draws are made for the whole global batch (``shard = (rank, world)``) and this rank's rows kept, as the
    crop and flip do, so a data-parallel run augments every sample as one process does.
    """
    parts = policy_parts(policy)
    if not parts:
        return normalise(pixels, spec)
    rank, world = shard
    n = pixels.shape[0]

    def draws(part: Augmentation) -> dict[str, Tensor]:
        drawn: dict[str, Any] = dict(part.draw(n * world, generator))
        return drawn if world == 1 else {k: v[rank::world] for k, v in drawn.items()}

    images = pixels.round().clamp(0, 255).to(torch.uint8)  # whole numbers already: uint8 images, zero padding
    pixel_parts = [p for p in parts if not getattr(p, "normalised", False)]
    for part in pixel_parts:
        images = part.apply(images, draws(part))
    x = normalise(images.to(pixels.dtype), spec)
    for part in parts[len(pixel_parts) :]:
        x = part.apply(x, draws(part))
    return x
