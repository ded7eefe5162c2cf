"""Split and dataset containers shared by the built-in datasets.

Two kinds of split: :class:`TensorImageSplit` keeps uint8 images in memory and describes its
augmentation as an :class:`ibcore.AugmentSpec` (so the engine can replay it on the device in batch);
:class:`ImageFileSplit` holds file paths and decodes each image only when it is indexed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ibcore import AugmentSpec, DataError


def count_classes(targets: np.ndarray, num_classes: int) -> list[int]:
    """Images per class, counted from labels only."""
    return [int(n) for n in np.bincount(targets, minlength=num_classes)[:num_classes]]


class TensorImageSplit:
    """A split held in memory as uint8 (N, C, H, W) images; ``__getitem__`` applies exactly ``augment``.

    ``source_indices`` says which images of the source files (in file order) the split holds, so a
    drawn subset can be checked and reproduced.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        num_classes: int,
        augment: AugmentSpec,
        source_indices: np.ndarray | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if len(augment.mean) != images.shape[1] or len(augment.std) != images.shape[1]:
            raise ValueError(f"augment mean/std need {images.shape[1]} channel values, got {augment}")
        self.num_classes = num_classes
        self.targets = np.ascontiguousarray(targets, dtype=np.int64)
        self.class_counts = count_classes(self.targets, num_classes)
        self.augment = augment
        self.source_indices = source_indices
        self._images = torch.from_numpy(np.ascontiguousarray(images))
        self._labels = torch.from_numpy(self.targets)
        channels = images.shape[1]
        self._mean = torch.tensor(augment.mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(augment.std, dtype=torch.float32).view(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._images[index]
        pad = self.augment.pad
        if pad:
            # Random crop of the original size from the zero-padded image; torch's global RNG so that
            # DataLoader workers (which seed it per worker) draw different crops.
            height, width = image.shape[-2:]
            padded = F.pad(image, (pad, pad, pad, pad))
            top = int(torch.randint(0, 2 * pad + 1, (1,)).item())
            left = int(torch.randint(0, 2 * pad + 1, (1,)).item())
            image = padded[:, top : top + height, left : left + width]
        if self.augment.flip and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return (image.float() / 255.0 - self._mean) / self._std, int(self.targets[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,), un-augmented (shared, do not modify)."""
        return self._images, self._labels

    def __repr__(self) -> str:
        shape = tuple(self._images.shape)
        return f"TensorImageSplit(images={shape}, num_classes={self.num_classes}, augment={self.augment})"


class ImageFileSplit:
    """A split of image files opened lazily: only ``__getitem__`` decodes an image.

    Images are converted to RGB and passed through ``transform`` (a torchvision transform).
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: np.ndarray,
        num_classes: int,
        transform: Callable[[Any], torch.Tensor],
    ) -> None:
        self.paths = list(paths)
        self.num_classes = num_classes
        self.targets = np.ascontiguousarray(targets, dtype=np.int64)
        self.class_counts = count_classes(self.targets, num_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"Image file {path} (item {index} of this split) does not exist.") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"Image file {path} (item {index} of this split) cannot be decoded: {exc}") from exc
        return self.transform(image), int(self.targets[index])

    def __repr__(self) -> str:
        return f"ImageFileSplit(images={len(self.paths)}, num_classes={self.num_classes})"


@dataclasses.dataclass
class ImageDataset:
    """What every built-in dataset factory returns: its splits (``val`` is ``None`` unless configured)."""

    num_classes: int
    train: TensorImageSplit | ImageFileSplit
    test: TensorImageSplit | ImageFileSplit
    val: TensorImageSplit | ImageFileSplit | None = None
    class_names: list[str] | None = None
