"""Throughput of K runs trained three ways, in one process (not a test).

(a) K plain PyTorch loops, one model after another, written the way LDAM-DRW / BagofTricks-LT do it: a
    DataLoader over PIL images with torchvision transforms (random crop with padding, flip, ToTensor,
    Normalize), fp32, torch.optim.SGD.
(b) the ibcore engine, sequential path (data on the device, per-sample augmentation there);
(c) the ibcore engine, fused path (runs of one architecture stacked with torch.func).

Prints images/s per run and the ratios (b)/(a), (c)/(a) of total throughput (images × runs per second); on CUDA
also the fraction of the device's dense bf16 peak reached for ResNet-32 (412 MFLOP per training image, forward
and backward).

    python benchmarks/throughput.py --device cpu            # small_cnn on MNIST-shaped data, K = 4 (~2 min on 2 cores)
    python benchmarks/throughput.py --device cuda --data ../shared/data/cifar10_lt100.npz   # ResNet-32, K = 1, 4, 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import ibcore
from ibcore import AugmentSpec, Params, register_dataset

RESNET32_FLOPS_PER_TRAIN_IMAGE = 412e6  # forward + backward, as stated in the issue
DENSE_BF16_PEAK = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}

# ------------------------------------------------------------------------------------------------
# Data: the real CIFAR-10-LT split when given, otherwise random images of the same shape.


class ArraySplit:
    """uint8 HWC images and labels as a tensor split (device path) and a PIL dataset (plain path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, augment: AugmentSpec) -> None:
        self.images = images  # (N, H, W, C) uint8
        self.targets = labels.astype(np.int64)
        self.num_classes = num_classes
        self.class_counts = np.bincount(self.targets, minlength=num_classes).tolist()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # only the engine's DataLoader path uses this
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 255
        return image, int(self.targets[index])


class ArrayDataset:
    def __init__(self, train: ArraySplit, test: ArraySplit) -> None:
        self.train, self.test, self.val = train, test, None
        self.num_classes = train.num_classes


class BenchParams(Params):
    path: str = ""
    shape: str = "cifar"


_ARRAYS: dict[str, Any] = {}


def load_arrays(path: str, shape: str) -> dict[str, Any]:
    if (path, shape) in _ARRAYS:
        return _ARRAYS[(path, shape)]
    if path:
        with np.load(path) as archive:
            arrays = {k: archive[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    elif shape == "mnist":
        with np.load(Path(ibcore.__file__).parent.parent / "ib_plugins_builtin" / "data" / "mnist5k.npz") as archive:
            images, labels = archive["images"][..., None], archive["labels"].astype(np.int64)
        first = np.concatenate([np.flatnonzero(labels == c)[:400] for c in range(10)])
        rest = np.setdiff1d(np.arange(len(labels)), first)
        arrays = {
            "train_images": images[first],
            "train_labels": labels[first],
            "test_images": images[rest],
            "test_labels": labels[rest],
        }
    else:  # CIFAR-10-LT IR100 shaped random data
        counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(10), counts)
        arrays = {
            "train_images": rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
            "train_labels": labels,
            "test_images": rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8),
            "test_labels": np.repeat(np.arange(10), 100),
        }
    _ARRAYS[(path, shape)] = arrays
    return arrays


def augment_for(shape: str) -> AugmentSpec:
    if shape == "mnist":
        return AugmentSpec(pad=2, flip=False, mean=(0.1307,), std=(0.3081,))
    return AugmentSpec(pad=4, flip=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


@register_dataset("benchmark_arrays", BenchParams)
def build_benchmark_arrays(params: BenchParams, context: Any) -> ArrayDataset:
    """The benchmark's data: a real long-tailed split from an npz file, or random data of the same shape."""
    arrays = load_arrays(params.path, params.shape)
    spec = augment_for(params.shape)
    test_spec = AugmentSpec(mean=spec.mean, std=spec.std)
    return ArrayDataset(
        ArraySplit(arrays["train_images"], arrays["train_labels"], 10, spec),
        ArraySplit(arrays["test_images"], arrays["test_labels"], 10, test_spec),
    )


# ------------------------------------------------------------------------------------------------
# (a) The plain loop.


class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: a PIL image per sample, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(pil), int(self.labels[index])


def plain_loop(
    k: int, shape: str, path: str, backbone: str, epochs: int, batch: int, device: torch.device, workers: int
) -> float:
    """Seconds per epoch (after one warm-up epoch) summed over K runs trained one after another."""
    arrays = load_arrays(path, shape)
    spec = augment_for(shape)
    size = arrays["train_images"].shape[1]
    transform = T.Compose(
        [
            T.RandomCrop(size, padding=spec.pad),
            *([T.RandomHorizontalFlip()] if spec.flip else []),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    dataset = PILDataset(arrays["train_images"], arrays["train_labels"], transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    context = ibcore.BuildContext(num_classes=10, class_counts=tuple(np.bincount(arrays["train_labels"]).tolist()))
    total = 0.0
    for run in range(k):
        torch.manual_seed(run)
        model = ibcore.build("backbone", backbone, {}, context=context).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        model.train()
        for epoch in range(epochs + 1):
            if epoch == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += (time.perf_counter() - started) / epochs
    return total


# ------------------------------------------------------------------------------------------------
# (b), (c) The engine.


def engine(
    k: int,
    fused: str,
    shape: str,
    path: str,
    backbone: str,
    epochs: int,
    batch: int,
    device: torch.device,
    precision: str,
    cuda_graphs: str = "auto",
) -> float:
    """Seconds per epoch (after one warm-up epoch) of the engine training K runs together."""
    losses = [
        {"name": "cross_entropy"},
        {"name": "focal", "params": {"gamma": 1.0}},
        {"name": "balanced_softmax"},
        {"name": "ldam", "params": {"s": 1.0}},
    ]
    config = {
        "seed": 0,
        "data": {
            "dataset": {"name": "benchmark_arrays", "params": {"path": path, "shape": shape}},
            "batch_size": batch,
        },
        "trainer": {
            "epochs": epochs + 1,
            "device": str(device),
            "precision": precision,
            "eval_every": 10_000,
            "checkpoint_every": 10_000,
            "fused": fused,
            "cuda_graphs": cuda_graphs,
            "data_on_device": "on",
        },
        "defaults": {
            "backbone": {"name": backbone},
            "optimizer": {"name": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4}},
        },
        "runs": [{"name": f"run{i}", "loss": losses[i % len(losses)]} for i in range(k)],
        "evaluators": [{"name": "accuracy"}],
    }
    with tempfile.TemporaryDirectory() as out:
        results = ibcore.run(config, out_dir=out, quiet=True)
        lines = [json.loads(line) for line in (results.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = {line["epoch"]: line["seconds"] for line in lines if line.get("split") == "train"}
    return sum(seconds[e] for e in range(1, epochs + 1)) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", default="", help="npz with train_images/train_labels/... (CUDA mode)")
    parser.add_argument("--runs", default=None, help="comma-separated K values (default: 4 on CPU, 1,4,8 on CUDA)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per measurement (after one warm-up)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the plain loop")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape, backbone = ("cifar", "resnet32") if cuda else ("mnist", "small_cnn")
    ks = [int(k) for k in (args.runs or ("1,4,8" if cuda else "4")).split(",")]
    epochs = args.epochs or (2 if cuda else 1)
    workers = args.workers if args.workers is not None else (8 if cuda else 1)
    batch = 128
    precision = "bf16" if cuda else "fp32"
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(
        f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; backbone {backbone}; batch {batch}; "
        f"engine precision {precision}; data: {args.data or 'synthetic ' + shape + '-shaped'}"
    )
    images = len(load_arrays(args.data, shape)["train_labels"])
    rows = []
    for k in ks:
        plain = plain_loop(k, shape, args.data, backbone, epochs, batch, device, workers)
        sequential = engine(k, "off", shape, args.data, backbone, epochs, batch, device, precision)
        # On CUDA even one run goes through the fused machinery: its step is replayed from a CUDA graph.
        fused = (
            engine(k, "on", shape, args.data, backbone, epochs, batch, device, precision)
            if k > 1 or cuda
            else sequential
        )
        timings = [("plain", plain), ("sequential", sequential), ("fused", fused)]
        if cuda and k > 1:  # what the graphs add: the same fused runs, kernel by kernel
            timings.append(
                ("fused_eager", engine(k, "on", shape, args.data, backbone, epochs, batch, device, precision, "off"))
            )
        # Each of the K runs trains `images` images per epoch; t seconds per epoch for all K together.
        row: dict[str, float] = {"K": k, "images_per_epoch": images}
        for label, seconds in timings:
            row[f"{label}_img_s_per_run"] = images / seconds
            row[f"{label}_total_img_runs_s"] = images * k / seconds
        row["sequential_vs_plain"] = plain / sequential
        row["fused_vs_plain"] = plain / fused
        if "fused_eager_total_img_runs_s" in row:
            row["fused_without_graphs_vs_plain"] = row["fused_eager_total_img_runs_s"] / row["plain_total_img_runs_s"]
        if cuda:
            peak = next(
                (v for key, v in DENSE_BF16_PEAK.items() if all(word in name for word in key.split())),
                DENSE_BF16_PEAK["H100 SXM"],
            )
            row["fused_fraction_of_bf16_peak"] = row["fused_total_img_runs_s"] * RESNET32_FLOPS_PER_TRAIN_IMAGE / peak
        rows.append(row)
        print(
            f"K={k}: img/s per run: plain {row['plain_img_s_per_run']:7.0f}, engine sequential "
            f"{row['sequential_img_s_per_run']:7.0f}, engine fused {row['fused_img_s_per_run']:7.0f} | "
            f"total (images x runs/s) vs plain: sequential {row['sequential_vs_plain']:.2f}x, "
            f"fused {row['fused_vs_plain']:.2f}x"
            + (
                f" (without CUDA graphs {row['fused_without_graphs_vs_plain']:.2f}x)"
                if "fused_without_graphs_vs_plain" in row
                else ""
            )
            + (f" | fused at {100 * row['fused_fraction_of_bf16_peak']:.2f}% of dense bf16 peak" if cuda else ""),
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
