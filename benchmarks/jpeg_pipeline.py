"""Images/s of the ImageNet-style JPEG input pipeline (not a test): the official code's loop against ibcore's.

Writes N synthetic ImageNet-sized JPEGs (500×375 smooth random photos, quality 90; nothing is downloaded)
in an ImageFolder tree under a temporary folder, or reads an existing tree (``--root``, with ``train/``),
then times, in one process, with the same workers, batch size and device:

- plain: ``torchvision.datasets.ImageFolder`` with PIL and ``transforms`` (RandomResizedCrop(224), flip,
  ToTensor, Normalize) in a shuffling DataLoader (workers restarted every epoch, pinned memory on CUDA),
  each batch copied to the device: the loop of the ImageNet-LT code bases;
- ibcore ``decode: pil``: the engine's DataLoader path over ``image_folder``, the same PIL work in
  persistent workers;
- ibcore ``decode: torchvision``: JPEGs decoded by torchvision, on a CUDA device in batch (nvjpeg), else in
  the workers, crops and flips as uint8 tensors.

Each variant runs ``--epochs`` passes over the images, the variants taking turns pass by pass (so a change in
the machine's load slows them alike); the first pass is a warm-up (workers start, files enter the page cache,
CUDA and nvjpeg initialise) and images/s is measured over the others. A pass ends with
``torch.cuda.synchronize()``, so decoding on the device is counted.

    python benchmarks/jpeg_pipeline.py --images 600 --epochs 2            # this project's 2-core CI machine
    python benchmarks/jpeg_pipeline.py --device cuda --json jpeg.json     # a GPU machine (2,000 images)
    python benchmarks/jpeg_pipeline.py --device cuda --root /data/imagenet_lt_subset --images 0
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision

import ibcore
from ibcore.engine.batches import LoaderData
from ibcore.engine.experiment_data import loader_workers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_photo(root: Path, index: int, images: int, classes: int, size: tuple[int, int], quality: int) -> None:
    """JPEG ``index``: a coarse random colour field upsampled bicubically, with grain, so it compresses like a
    photo; seeded by its index (the same files however many processes write them)."""
    from PIL import Image

    rng = np.random.default_rng(index)
    split, label = ("train", index % classes) if index < images else ("test", index - images)
    folder = root / split / f"class_{label:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    photo = np.clip(smooth + rng.integers(-8, 9, smooth.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(folder / f"{index:06d}.jpg", quality=quality)


def write_photos(root: Path, images: int, classes: int, size: tuple[int, int], quality: int) -> None:
    """``images`` JPEGs in root/train/<class>/, and one per class in root/test/ (image_folder needs a test
    split), written by one process per CPU."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(write_photo, root, i, images, classes, size, quality) for i in range(images + classes)]
        for job in jobs:
            job.result()


def plain_batches(root: Path, batch_size: int, workers: int, device: torch.device) -> Callable[[int], Iterator[Any]]:
    """The official loop: an ImageFolder of PIL images with torchvision's transforms, each batch sent to the device."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda"
    )

    def epoch(_: int) -> Iterator[Any]:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return epoch


def ibcore_batches(
    root: Path, batch_size: int, workers: int, device: torch.device, decode: str, decode_device: str
) -> Callable[[int], Iterator[Any]]:
    """The engine's path: ``image_folder``'s train split read by LoaderData, as a lane reads it each epoch."""
    params = {"root": str(root), "decode": decode}
    if decode == "torchvision":
        params["decode_device"] = decode_device
    split = ibcore.build("dataset", "image_folder", params).train
    data = LoaderData(split, device, workers)

    def epoch(number: int) -> Iterator[Any]:
        generator = torch.Generator()
        generator.manual_seed(number)
        order = np.random.default_rng(number).permutation(len(split))
        yield from data.iterate(order, batch_size, generator, True, False)

    return epoch


def timed_pass(epochs: Callable[[int], Iterator[Any]], number: int, device: torch.device) -> tuple[int, float]:
    """Images and seconds of pass ``number``, its last batch on the device (a GPU's queue drained)."""
    start, count = time.perf_counter(), 0
    for x, _ in epochs(number):
        count += int(x.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count, time.perf_counter() - start


def summary(passes: list[tuple[int, float]]) -> dict[str, Any]:
    """Images/s over the passes after the first (the warm-up)."""
    timed = passes[1:] or passes
    return {
        "images_per_s": sum(n for n, _ in timed) / sum(s for _, s in timed),
        "warmup_s": passes[0][1],
        "passes": [{"images": n, "seconds": s} for n, s in passes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic training JPEGs to write (0 with --root)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--root", type=Path, help="an existing ImageFolder tree (root/train/<class>/*, root/test/...)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workers", default="auto", help="DataLoader workers for every variant ('auto' as the engine)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="passes per variant, the first a warm-up")
    parser.add_argument("--decode-device", choices=["auto", "cpu"], default="auto", help="for decode: torchvision")
    parser.add_argument("--variants", default="plain,torchvision,pil", help="comma-separated, in the order run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    automatic = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(automatic if args.device == "auto" else args.device)
    workers = loader_workers("auto" if args.workers == "auto" else int(args.workers))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    setup = {
        "device": str(device),
        "device_name": where,
        "cpus": os.cpu_count(),
        "workers": workers,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "decode_device": args.decode_device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }
    print(f"device {device} ({where}), {workers} workers, batch {args.batch_size}, {args.epochs} passes", flush=True)
    results: dict[str, Any] = {}
    if hasattr(os, "getloadavg"):
        setup["load_average_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ib_jpeg_") as scratch:
        root = args.root or Path(scratch)
        if args.root is None:
            started = time.perf_counter()
            write_photos(root, args.images, args.classes, (500, 375), quality=90)
            print(
                f"wrote {args.images} JPEGs (500x375, quality 90) in {time.perf_counter() - started:.1f} s", flush=True
            )
        pipelines = {
            "plain": lambda: plain_batches(root, args.batch_size, workers, device),
            "pil": lambda: ibcore_batches(root, args.batch_size, workers, device, "pil", args.decode_device),
            "torchvision": lambda: ibcore_batches(
                root, args.batch_size, workers, device, "torchvision", args.decode_device
            ),
        }
        names = args.variants.split(",")
        epochs = {name: pipelines[name]() for name in names}
        passes: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
        # Pass by pass, the variants in turn: a machine whose load changes slows them alike.
        for number in range(args.epochs):
            for name in names:
                passes[name].append(timed_pass(epochs[name], number, device))
                images, seconds = passes[name][-1]
                print(f"pass {number + 1} {name:12s} {images / seconds:8.1f} images/s", flush=True)
            results = {name: summary(passes[name]) for name in names}
            if args.json:  # after every round: a run stopped by a time limit keeps what it measured
                args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    print(f"\nimages/s over passes 2..{args.epochs} (pass 1 warms up):")
    for name, measured in results.items():
        line = f"{name:12s} {measured['images_per_s']:8.1f}"
        if name != "plain" and "plain" in results:
            line += f"  {measured['images_per_s'] / results['plain']['images_per_s']:.2f}x plain"
        print(line)


if __name__ == "__main__":
    main()
