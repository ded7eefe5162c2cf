"""Split and dataset containers shared by the built-in datasets.

Two kinds of split: :class:`TensorImageSplit` keeps uint8 images in memory and describes its
augmentation as an :class:`ibcore.AugmentSpec` (so the engine can replay it on the device in batch);
:class:`ImageFileSplit` holds file paths and decodes each image only when it is indexed (or, for
``decode: torchvision``, offers the engine a batch reader that decodes in DataLoader workers or on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ib_plugins_builtin.datasets._image_recipe import ImageRecipe
from ib_plugins_builtin.datasets._jpeg import ImageFileReader, open_rgb
from ibcore import AugmentSpec


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


Decoder = Literal["pil", "torchvision"]
DecodeDevice = Literal["auto", "cpu"]


class ImageFileSplit:
    """A split of image files opened lazily: only ``__getitem__`` (or a DataLoader worker) decodes an image.

    Each image goes through ``recipe`` (:class:`ImageRecipe`). ``decode: pil`` opens it with PIL and runs
    torchvision's transforms; ``decode: torchvision`` decodes JPEGs with torchvision, on the device in batch
    when the engine trains on CUDA (``decode_device: auto``), and runs the recipe on uint8 tensors (``_jpeg``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: np.ndarray,
        num_classes: int,
        recipe: ImageRecipe,
        decode: Decoder = "pil",
        decode_device: DecodeDevice = "auto",
    ) -> None:
        self.paths = list(paths)
        self.num_classes = num_classes
        self.targets = np.ascontiguousarray(targets, dtype=np.int64)
        self.class_counts = count_classes(self.targets, num_classes)
        self.recipe = recipe
        self.decode = decode
        self.decode_device = decode_device
        self.transform = recipe.pil_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The normalised image and its label; random draws from torch's global generator (as transforms')."""
        if self.decode == "pil":
            return self.transform(open_rgb(self.paths[index], index)), int(self.targets[index])
        crop = self.batch_reader(torch.device("cpu")).decoded_item(index, None)
        return self.recipe.normalise(crop[None])[0], int(self.targets[index])

    def batch_reader(self, device: torch.device) -> ImageFileReader | None:
        """How the engine's DataLoader reads this split for training on ``device`` (None: ``split[i]``, for PIL)."""
        if self.decode == "pil":
            return None
        on_gpu = device.type == "cuda"
        return ImageFileReader(
            self.paths,
            self.targets,
            self.recipe,
            decode_on_device=on_gpu and self.decode_device == "auto",
            normalise_on_device=on_gpu,
        )

    def __repr__(self) -> str:
        return f"ImageFileSplit(images={len(self.paths)}, num_classes={self.num_classes}, decode={self.decode!r})"


@dataclasses.dataclass
class ImageDataset:
    """What every built-in dataset factory returns: its splits (``val`` is ``None`` unless configured)."""

    num_classes: int
    train: TensorImageSplit | ImageFileSplit
    test: TensorImageSplit | ImageFileSplit
    val: TensorImageSplit | ImageFileSplit | None = None
    class_names: list[str] | None = None
