"""The ImageNet recipe of the image-file data sets, in two forms that draw alike: PIL images and uint8 tensors.

Training: RandomResizedCrop(image_size) (area 8–100 %, aspect ratio 3/4–4/3) and a horizontal flip with
probability 0.5; evaluation: Resize(round(image_size · 256/224)) + CenterCrop(image_size). Both end with
``(x / 255 - mean) / std`` per channel.

``decode: pil`` runs torchvision's transforms on PIL images (:meth:`ImageRecipe.pil_transform`).
``decode: torchvision`` runs the tensor form: :meth:`ImageRecipe.draw` makes the same random calls as
those transforms, in the same order, so one seed cuts the same box and flips alike in both forms;
:meth:`ImageRecipe.crop` resamples with torch's antialiased bilinear filter, which lands within one level
(of 0..255) of PIL's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: RandomResizedCrop's defaults (torchvision, and every ImageNet-LT code base)
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: RandomResizedCrop's tries at a box inside the image before it falls back to a central crop
CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class CropDraw:
    """One training sample's random draw: the box of RandomResizedCrop (in source pixels) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """What a split does to each image: the training recipe (``random_crop``) or the evaluation one."""

    image_size: int
    random_crop: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def resize_to(self) -> int:
        """The shorter side before the evaluation centre crop: 256 for the usual 224."""
        return round(self.image_size * 256 / 224)

    def pil_transform(self) -> Callable[[Any], Tensor]:
        """The recipe as torchvision transforms of a PIL image (what ``decode: pil`` runs)."""
        from torchvision import transforms

        steps: list[Any] = (
            [transforms.RandomResizedCrop(self.image_size, CROP_AREA, CROP_RATIO), transforms.RandomHorizontalFlip()]
            if self.random_crop
            else [transforms.Resize(self.resize_to), transforms.CenterCrop(self.image_size)]
        )
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def draw(self, height: int, width: int, generator: torch.Generator | None) -> CropDraw | None:
        """The random box and flip for a ``height`` × ``width`` image; None for the evaluation recipe.

        The calls of torchvision's ``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip``, in their
        order, on ``generator`` (None: torch's global generator, which those transforms use).
        """
        if not self.random_crop:
            return None
        area = height * width
        log_ratio = torch.log(torch.tensor(CROP_RATIO))
        for _ in range(CROP_TRIES):
            target_area = area * torch.empty(1).uniform_(*CROP_AREA, generator=generator).item()
            low, high = float(log_ratio[0]), float(log_ratio[1])
            aspect_ratio = torch.exp(torch.empty(1).uniform_(low, high, generator=generator)).item()
            box_width = int(round(math.sqrt(target_area * aspect_ratio)))
            box_height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < box_width <= width and 0 < box_height <= height:
                top = int(torch.randint(0, height - box_height + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - box_width + 1, size=(1,), generator=generator).item())
                break
        else:  # torchvision's fallback: the largest central box within the ratio range
            ratio = width / height
            if ratio < min(CROP_RATIO):
                box_width, box_height = width, int(round(width / min(CROP_RATIO)))
            elif ratio > max(CROP_RATIO):
                box_width, box_height = int(round(height * max(CROP_RATIO))), height
            else:
                box_width, box_height = width, height
            top, left = (height - box_height) // 2, (width - box_width) // 2
        flip = bool(torch.rand(1, generator=generator).item() < 0.5)
        return CropDraw(top, left, box_height, box_width, flip)

    def crop(self, image: Tensor, draw: CropDraw | None) -> Tensor:
        """uint8 (3, H, W) → uint8 (3, image_size, image_size) on the image's device: ``draw``'s box resized
        (antialiased bilinear) and flipped, or, without a draw, the evaluation resize and centre crop."""
        from torchvision.transforms.v2 import functional as F

        size = [self.image_size, self.image_size]
        if draw is None:
            return F.center_crop(F.resize(image, [self.resize_to], antialias=True), size)
        cropped = F.resized_crop(image, draw.top, draw.left, draw.height, draw.width, size, antialias=True)
        return cropped.flip(-1) if draw.flip else cropped

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (3, S, S) or (N, 3, S, S) → ``(x / 255 - mean) / std`` in the default float dtype, on the images'
        device; computed as ``x * (1 / (255 std)) - mean / std`` in place (one new tensor, not four)."""
        scale, shift = _channel_constants(self.mean, self.std, images.device, torch.get_default_dtype())
        return images.to(scale.dtype).mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=16)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``1 / (255 std)`` and ``mean / std`` as (C, 1, 1) tensors on ``device``, made once (a copy per batch would
    sync with a GPU)."""
    mean_, std_ = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std_), mean_ / std_
    return scale.to(dtype).view(-1, 1, 1).to(device), shift.to(dtype).view(-1, 1, 1).to(device)
