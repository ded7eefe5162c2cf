"""Cost of the augmentation policies (not a test): the device path against torchvision's per-sample loop.

For each policy, on one batch of random uint8 CIFAR-shaped images, in one process:

* ``device path``: ``policy.apply(images, policy.draw(n, generator))``, the vectorised per-sample ops of
  ib_plugins_builtin.augmentations (what the engine runs on the batch, here on ``--device``);
* ``loop (tensor)``: torchvision.transforms.v2's transform called on each image in a plain Python loop, on
  uint8 tensors (what a DataLoader worker does per sample with tensor images);
* ``loop (PIL)``: the same transform on PIL images (the classic CIFAR pipeline: PIL → transform), when the
  transform takes PIL images. Cutout has no torchvision transform: the loop runs the original code
  (github.com/uoguelph-mlrg/Cutout, util/cutout.py) per image on a float tensor.

Prints images per second of each and the ratio device path / loop (best of ``--repeats`` after a warm-up;
the loops run in this process, with no DataLoader workers).

    python benchmarks/augment_cost.py                 # CPU, 512 images
    python benchmarks/augment_cost.py --threads 1     # one CPU thread for every path
    python benchmarks/augment_cost.py --device cuda   # device path on the GPU (loops stay on the CPU)
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ib_plugins_builtin.augmentations._policies import (
    AutoAugment,
    ColorJitter,
    Cutout,
    RandAugment,
    TrivialAugmentWide,
)


class OriginalCutout:
    """util/cutout.py of github.com/uoguelph-mlrg/Cutout (numpy's global RNG, as there)."""

    def __init__(self, n_holes: int, length: int) -> None:
        self.n_holes = n_holes
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.size(1), img.size(2)
        mask = np.ones((h, w), np.float32)
        for _ in range(self.n_holes):
            y, x = np.random.randint(h), np.random.randint(w)
            y1, y2 = np.clip(y - self.length // 2, 0, h), np.clip(y + self.length // 2, 0, h)
            x1, x2 = np.clip(x - self.length // 2, 0, w), np.clip(x + self.length // 2, 0, w)
            mask[y1:y2, x1:x2] = 0.0
        return img * torch.from_numpy(mask).expand_as(img)


def run_policy(policy: Any, images: torch.Tensor, generator: torch.Generator) -> None:
    """The device path: draw for the batch, then apply."""
    policy.apply(images, policy.draw(images.shape[0], generator))


def run_loop(transform: Callable[[Any], object], inputs: Sequence[Any]) -> None:
    """The DataLoader path without workers: the transform on each sample in turn."""
    for image in inputs:
        transform(image)


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (grid cache, allocator)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    cpu_images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=torch.manual_seed(0))
    images = cpu_images.to(device)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in cpu_images]
    float_images = [image.float() / 255 for image in cpu_images]

    cases: list[tuple[str, object, object, bool]] = [
        ("AutoAugment(cifar10)", AutoAugment("cifar10"), T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=0), True),
        ("RandAugment(2, 9)", RandAugment(), T.RandAugment(fill=0), True),
        ("TrivialAugmentWide", TrivialAugmentWide(), T.TrivialAugmentWide(fill=0), True),
        ("ColorJitter(.4,.4,.4,.1)", ColorJitter(0.4, 0.4, 0.4, 0.1), T.ColorJitter(0.4, 0.4, 0.4, 0.1), True),
        ("Cutout(16)", Cutout(16, normalised=False), OriginalCutout(1, 16), False),
    ]
    print(
        f"batch {args.batch} of 3x32x32 uint8; device path on {device}; loops on the CPU; "
        f"{torch.get_num_threads()} CPU threads; best of {args.repeats}"
    )
    header = f"{'policy':<26}{'device path':>14}{'loop (tensor)':>15}{'ratio':>8}{'loop (PIL)':>13}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, policy, transform, takes_pil in cases:
        generator = torch.Generator().manual_seed(1)
        device_path = functools.partial(run_policy, policy, images, generator)
        tensor_loop = functools.partial(run_loop, transform, cpu_images if takes_pil else float_images)
        fast = args.batch / best_time(device_path, args.repeats, sync)
        loop = args.batch / best_time(tensor_loop, args.repeats, lambda: None)
        line = f"{name:<26}{fast:>12,.0f}/s{loop:>13,.0f}/s{fast / loop:>7.1f}x"
        if takes_pil:
            pil = args.batch / best_time(functools.partial(run_loop, transform, pil_images), args.repeats, lambda: None)
            line += f"{pil:>11,.0f}/s{fast / pil:>7.1f}x"
        print(line)


if __name__ == "__main__":
    main()
