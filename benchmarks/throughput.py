"""Throughput of K runs trained three ways, in one process, per scenario (not a test).

(a) plain: K plain PyTorch loops, one model after another, written the way LDAM-DRW / BagofTricks-LT do it: a
    DataLoader over PIL images with torchvision transforms (random crop with padding, flip, ToTensor,
    Normalize), fp32. One loop of each kind is timed once (K = 1); K loops one after another take the sum of
    their times, so a K scan does not train K plain models to learn what K times one loop costs.
(b) sequential: the ibcore engine, runs one after another (data on the device, per-sample augmentation there);
(c) fused: the ibcore engine with `trainer.fused: on` (runs of one architecture stacked with torch.func; on CUDA
    the step is replayed from a CUDA graph). On CUDA, for K <= 8 also the same fused runs without graphs.

Scenarios (--scenario, repeatable or comma-separated), each with the plain loop that matches it:
  plain   engine: losses cross_entropy, focal, balanced_softmax, ldam in turn, SGD.
          plain loop: cross_entropy, torch.optim.SGD (the loss costs next to nothing beside the model).
  mixers  engine: mixers input_mixup, cutmix, remix in turn, cross_entropy, SGD.
          plain loop: the official codes' batch mixing on the device: lam from np.random.beta, a
          torch.randperm pairing, loss lam·CE(y) + (1-lam)·CE(y[perm]) (mixup-cifar10); CutMix's rand_bbox box
          and lam recomputed from it (clovaai/CutMix-PyTorch); Remix's per-sample label weights.
  adam    engine: optimizers adam and adamw in turn (lr 1e-3, weight_decay 5e-4), cross_entropy.
          plain loop: torch.optim.Adam / torch.optim.AdamW with the same settings.
  crt     engine: two stages; the first epoch trains the whole model, then cRT (`retrain_classifier`) and LWS
          (`scale_classifier`) runs in turn train only the classifier (a per-class scale for LWS) on
          class-balanced batches with a new SGD. Timed: the second stage only, after one warm-up epoch of its
          own (the stage switch builds new optimizers, groups and graphs, as the first epoch does).
          plain loop: the backbone in eval mode with requires_grad False, a re-initialised classifier (cRT) or
          a per-class scale on the logits (LWS) as the only parameters, torch.optim.SGD, and a
          WeightedRandomSampler with weights 1/class count.

Prints, per scenario and K: images × runs per second of the fused path, images/s per run, the ratio to K plain
loops; on CUDA also the share of the GPU's dense bf16 peak (ResNet-32: 412 MFLOP per training image, forward and
backward; a third of it in the crt scenario, where the frozen backbone only runs forward) and the peak CUDA memory
of each measurement. Timings exclude warm-up epochs, evaluation and checkpoints.

    python benchmarks/throughput.py --device cpu            # small_cnn on MNIST-shaped data, K = 4 (~2 min on 2 cores)
    python benchmarks/throughput.py --device cpu --scenario mixers,adam,crt --runs 2
    python benchmarks/throughput.py --device cuda --data ../shared/data/cifar10_lt100.npz   # ResNet-32, K = 1..64
    python benchmarks/throughput.py --device cuda --data PATH --scenario mixers --runs 8 --json mixers.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
RESNET32_FLOPS_PER_FORWARD_IMAGE = RESNET32_FLOPS_PER_TRAIN_IMAGE / 3  # the backward pass costs about twice the forward
DENSE_BF16_PEAK = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}
# Beyond this K the sequential engine path (K times slower than fused, and known) and the graph-less fused path are
# measured only on request: they would take most of a short GPU session.
SECONDARY_PATHS_MAX_K = 8
GIB = 2**30

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


_ARRAYS: dict[tuple[str, str], dict[str, Any]] = {}


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
# What is measured: the settings every measurement shares, the scenarios, one measurement's result.


@dataclass(frozen=True)
class Setup:
    device: torch.device
    shape: str
    path: str
    backbone: str
    epochs: int  # timed epochs per measurement
    batch: int
    precision: str
    workers: int  # DataLoader workers of the plain loop

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


SGD_PARAMS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4}
MIXERS = [
    {"name": "input_mixup", "params": {"alpha": 1.0}},
    {"name": "cutmix", "params": {"alpha": 1.0}},
    {"name": "remix", "params": {"alpha": 1.0, "kappa": 3.0, "tau": 0.5}},
]
ADAM_LR, ADAM_WEIGHT_DECAY = 1e-3, 5e-4
CRT_SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
LWS_SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}  # decay on the scales would shrink every logit


def plain_scenario_runs(k: int) -> list[dict[str, Any]]:
    losses = [
        {"name": "cross_entropy"},
        {"name": "focal", "params": {"gamma": 1.0}},
        {"name": "balanced_softmax"},
        {"name": "ldam", "params": {"s": 1.0}},
    ]
    return [{"name": f"run{i}", "loss": losses[i % len(losses)]} for i in range(k)]


def mixers_scenario_runs(k: int) -> list[dict[str, Any]]:
    return [
        {"name": f"{MIXERS[i % 3]['name']}{i}", "loss": {"name": "cross_entropy"}, "mixer": MIXERS[i % 3]}
        for i in range(k)
    ]


def adam_scenario_runs(k: int) -> list[dict[str, Any]]:
    optimizers = ["adam", "adamw"]
    return [
        {
            "name": f"{optimizers[i % 2]}{i}",
            "loss": {"name": "cross_entropy"},
            "optimizer": {"name": optimizers[i % 2], "params": {"lr": ADAM_LR, "weight_decay": ADAM_WEIGHT_DECAY}},
        }
        for i in range(k)
    ]


def crt_scenario_runs(k: int) -> list[dict[str, Any]]:
    def second_stage(i: int) -> dict[str, Any]:
        # from_epoch 1: the first epoch learns the representation; every later epoch is the classifier stage.
        retrain = i % 2 == 0
        return {
            "from_epoch": 1,
            "retrain_classifier" if retrain else "scale_classifier": True,
            "sampler": {"name": "class_balanced"},
            "optimizer": {"name": "sgd", "params": {**(CRT_SGD if retrain else LWS_SGD), "schedule": "cosine"}},
        }

    return [
        {"name": f"{'crt' if i % 2 == 0 else 'lws'}{i}", "loss": {"name": "cross_entropy"}, "stages": [second_stage(i)]}
        for i in range(k)
    ]


@dataclass(frozen=True)
class Scenario:
    name: str
    engine_runs: Callable[[int], list[dict[str, Any]]]  # the engine's `runs:` for K runs
    plain_variants: tuple[str, ...]  # the plain loop of run i is plain_variants[i % len]
    warmup_epochs: int  # untimed epochs before the timed ones
    flops_per_image: float  # ResNet-32 work per training image in the timed epochs


SCENARIOS = {
    "plain": Scenario("plain", plain_scenario_runs, ("sgd",), 1, RESNET32_FLOPS_PER_TRAIN_IMAGE),
    "mixers": Scenario(
        "mixers", mixers_scenario_runs, ("input_mixup", "cutmix", "remix"), 1, RESNET32_FLOPS_PER_TRAIN_IMAGE
    ),
    "adam": Scenario("adam", adam_scenario_runs, ("adam", "adamw"), 1, RESNET32_FLOPS_PER_TRAIN_IMAGE),
    # One warm-up epoch per stage: the first stage's, then the classifier stage's own first epoch.
    "crt": Scenario("crt", crt_scenario_runs, ("crt", "lws"), 2, RESNET32_FLOPS_PER_FORWARD_IMAGE),
}


@dataclass
class Measurement:
    seconds: float | None = None  # per timed epoch, all runs of the measurement together
    peak_memory_bytes: int | None = None  # CUDA only
    error: str | None = None
    warmup_seconds: tuple[float, ...] = ()  # the engine's untimed epochs (cuDNN autotuning, graph captures)
    engine_notes: tuple[str, ...] = ()  # the engine's log lines on grouping and CUDA graphs


def measured(setup: Setup, body: Callable[[], Measurement]) -> Measurement:
    """Runs one measurement with the CUDA peak-memory counter reset; a failure is recorded, not raised, so that
    one broken path does not cost the rest of a short GPU session."""
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
    try:
        result = body()
    except Exception as error:  # any failure of a path is a result worth printing
        result = Measurement(error=f"{type(error).__name__}: {error}"[:2000])
    if setup.cuda:
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(setup.device)
        torch.cuda.empty_cache()
    return result


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


LossOf = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def mixup_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """facebookresearch/mixup-cifar10, train.py: mixup_data and mixup_criterion."""
    lam = float(np.random.beta(1.0, 1.0))
    index = torch.randperm(x.size(0)).to(x.device)
    logits = model(lam * x + (1 - lam) * x[index])
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[index])


def cutmix_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """clovaai/CutMix-PyTorch, train.py: rand_bbox, the partner's pixels pasted in, lam from the box's area."""
    lam = float(np.random.beta(1.0, 1.0))
    index = torch.randperm(x.size(0)).to(x.device)
    width, height = x.size(2), x.size(3)
    cut_ratio = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(width * cut_ratio), int(height * cut_ratio)
    cx, cy = np.random.randint(width), np.random.randint(height)
    x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x[:, :, x1:x2, y1:y2] = x[index, :, x1:x2, y1:y2]
    lam = 1 - (x2 - x1) * (y2 - y1) / (width * height)
    logits = model(x)
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[index])


def remix_loss_for(class_counts: torch.Tensor, kappa: float = 3.0, tau: float = 0.5) -> LossOf:
    """Chou et al., 'Remix: Rebalanced Mixup': mixup's inputs, the label weight moved to the minority class."""

    def remix_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam = float(np.random.beta(1.0, 1.0))
        index = torch.randperm(x.size(0)).to(x.device)
        logits = model(lam * x + (1 - lam) * x[index])
        ratio = class_counts[y] / class_counts[y[index]]
        weight = torch.full_like(ratio, lam)
        weight[(ratio >= kappa) & (lam < tau)] = 0.0
        weight[(ratio <= 1 / kappa) & (1 - lam < tau)] = 1.0
        own = F.cross_entropy(logits, y, reduction="none")
        partner = F.cross_entropy(logits, y[index], reduction="none")
        return (weight * own + (1 - weight) * partner).mean()

    return remix_loss


def cross_entropy_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def plain_training(
    variant: str, model: torch.nn.Module, class_counts: np.ndarray, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, LossOf]:
    """The model to call, its optimizer and the loss of one batch, as the plain code of ``variant`` sets them up."""
    if variant in ("crt", "lws"):
        # Decoupled classifier learning: the backbone is frozen, BatchNorm statistics too (eval mode).
        model.requires_grad_(False)
        model.eval()
        if variant == "crt":
            model.reset_classifier()  # type: ignore[operator]
            model.classifier.requires_grad_(True)
            model.classifier.train()
            optimizer = torch.optim.SGD(model.classifier.parameters(), **CRT_SGD)
            return model, optimizer, cross_entropy_loss
        scaled = ScaledLogits(model, len(class_counts)).to(device)
        return scaled, torch.optim.SGD([scaled.class_scale], **LWS_SGD), cross_entropy_loss
    model.train()
    if variant in ("adam", "adamw"):
        adam = torch.optim.Adam if variant == "adam" else torch.optim.AdamW
        return model, adam(model.parameters(), lr=ADAM_LR, weight_decay=ADAM_WEIGHT_DECAY), cross_entropy_loss
    optimizer = torch.optim.SGD(model.parameters(), **SGD_PARAMS)
    loss_of = {
        "sgd": cross_entropy_loss,
        "input_mixup": mixup_loss,
        "cutmix": cutmix_loss,
        "remix": remix_loss_for(torch.as_tensor(class_counts, dtype=torch.float32, device=device)),
    }[variant]
    return model, optimizer, loss_of


class ScaledLogits(torch.nn.Module):
    """LWS (Kang et al., ICLR 2020): the frozen model's logits times one learnt scale per class."""

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.class_scale = torch.nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.class_scale


def plain_loop(variant: str, setup: Setup) -> Measurement:
    """Seconds per timed epoch of one plain run (after one warm-up epoch)."""
    arrays = load_arrays(setup.path, setup.shape)
    spec = augment_for(setup.shape)
    size = arrays["train_images"].shape[1]
    transform = T.Compose(
        [
            T.RandomCrop(size, padding=spec.pad),
            *([T.RandomHorizontalFlip()] if spec.flip else []),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    labels = arrays["train_labels"]
    class_counts = np.bincount(labels, minlength=10)
    dataset = PILDataset(arrays["train_images"], labels, transform)
    # cRT and LWS re-train on class-balanced batches, as the engine's stage does.
    sampler = (
        torch.utils.data.WeightedRandomSampler(1.0 / class_counts[labels], num_samples=len(labels), replacement=True)
        if variant in ("crt", "lws")
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=setup.batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=setup.workers,
        pin_memory=setup.cuda,
        persistent_workers=setup.workers > 0,
    )
    context = ibcore.BuildContext(num_classes=10, class_counts=tuple(class_counts.tolist()))
    torch.manual_seed(0)
    np.random.seed(0)
    backbone = ibcore.build("backbone", setup.backbone, {}, context=context).to(setup.device)
    model, optimizer, loss_of = plain_training(variant, backbone, class_counts, setup.device)
    for epoch in range(setup.epochs + 1):
        if epoch == 1:
            if setup.cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        for x, y in loader:
            x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
            loss = loss_of(model, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if setup.cuda:
        torch.cuda.synchronize()
    return Measurement(seconds=(time.perf_counter() - started) / setup.epochs)


# ------------------------------------------------------------------------------------------------
# (b), (c) The engine.


def engine_config(scenario: Scenario, k: int, fused: str, cuda_graphs: str, setup: Setup) -> dict[str, Any]:
    return {
        "seed": 0,
        "data": {
            "dataset": {"name": "benchmark_arrays", "params": {"path": setup.path, "shape": setup.shape}},
            "batch_size": setup.batch,
        },
        "trainer": {
            "epochs": scenario.warmup_epochs + setup.epochs,
            "device": str(setup.device),
            "precision": setup.precision,
            "eval_every": 10_000,
            "checkpoint_every": 10_000,
            "fused": fused,
            "cuda_graphs": cuda_graphs,
            "data_on_device": "on",
        },
        "defaults": {"backbone": {"name": setup.backbone}, "optimizer": {"name": "sgd", "params": SGD_PARAMS}},
        "runs": scenario.engine_runs(k),
        "evaluators": [{"name": "accuracy"}],
    }


def engine(scenario: Scenario, k: int, fused: str, setup: Setup, cuda_graphs: str = "auto") -> Measurement:
    """Seconds per timed epoch of the engine training K runs together, and what its log says about grouping."""
    config = engine_config(scenario, k, fused, cuda_graphs, setup)
    with tempfile.TemporaryDirectory() as out:
        results = ibcore.run(config, out_dir=out, quiet=True)
        lines = [json.loads(line) for line in (results.run_dir / "metrics.jsonl").read_text().splitlines()]
        log = (results.run_dir / "train.log").read_text().splitlines()
    # A train line's epoch counts the epochs completed: the timed ones come after the warm-up epochs.
    seconds = {line["epoch"]: line["seconds"] for line in lines if line.get("split") == "train"}
    timed = range(scenario.warmup_epochs + 1, scenario.warmup_epochs + setup.epochs + 1)
    warmup = tuple(seconds[e] for e in range(1, scenario.warmup_epochs + 1))
    notes = []
    for line in log:
        text = line.split(" ", 2)[-1]  # without the date and time
        if ("fused path" in text or "CUDA graphs" in text) and text not in notes:
            notes.append(text)
    return Measurement(
        seconds=sum(seconds[e] for e in timed) / setup.epochs, warmup_seconds=warmup, engine_notes=tuple(notes)
    )


# ------------------------------------------------------------------------------------------------
# Rows and output.


def dense_bf16_peak(device_name: str) -> float:
    return next(
        (v for key, v in DENSE_BF16_PEAK.items() if all(word in device_name for word in key.split())),
        DENSE_BF16_PEAK["H100 SXM"],
    )


def measure_row(
    scenario: Scenario,
    k: int,
    setup: Setup,
    plain_by_variant: dict[str, Measurement],
    want_sequential: bool | None,
    want_fused_eager: bool | None,
    device_name: str,
    on_progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """One row: the K plain loops, then the fused path, then the optional paths; ``on_progress`` sees the row after
    each measurement, so that a run stopped by a timeout still leaves what it measured."""
    images = len(load_arrays(setup.path, setup.shape)["train_labels"])
    row: dict[str, Any] = {"scenario": scenario.name, "K": k, "images_per_epoch": images}

    def add(label: str, result: Measurement) -> None:
        # Each of the K runs trains `images` images per epoch; t seconds per epoch for all K together.
        if result.seconds:
            row[f"{label}_img_s_per_run"] = images / result.seconds
            row[f"{label}_total_img_runs_s"] = images * k / result.seconds
            row[f"{label}_seconds_per_epoch"] = result.seconds
            if label != "plain" and row.get("plain_seconds_per_epoch"):
                row[f"{label}_vs_plain"] = row["plain_seconds_per_epoch"] / result.seconds
        if result.warmup_seconds:
            row[f"{label}_warmup_epoch_seconds"] = list(result.warmup_seconds)
        if result.peak_memory_bytes is not None:
            row[f"{label}_peak_memory_gib"] = result.peak_memory_bytes / GIB
        if result.error:
            row[f"{label}_error"] = result.error
        if result.engine_notes:
            row[f"{label}_engine_log"] = list(result.engine_notes)
        on_progress(row)

    for variant in scenario.plain_variants[:k]:
        if variant not in plain_by_variant:
            plain_by_variant[variant] = measured(setup, functools.partial(plain_loop, variant, setup))
    run_variants = [scenario.plain_variants[i % len(scenario.plain_variants)] for i in range(k)]
    plain_errors = sorted({error for v in run_variants if (error := plain_by_variant[v].error)})
    add(
        "plain",
        Measurement(
            seconds=None if plain_errors else sum(plain_by_variant[v].seconds or 0.0 for v in run_variants),
            # K plain loops one after another need no more memory than the largest one
            peak_memory_bytes=max((plain_by_variant[v].peak_memory_bytes or 0) for v in set(run_variants)) or None,
            error="; ".join(plain_errors) or None,
        ),
    )
    # On CUDA even one run goes through the fused machinery: its step is replayed from a CUDA graph.
    add("fused", measured(setup, lambda: engine(scenario, k, "on", setup)))
    if setup.cuda and setup.backbone == "resnet32" and "fused_total_img_runs_s" in row:
        peak = dense_bf16_peak(device_name)
        row["fused_fraction_of_bf16_peak"] = row["fused_total_img_runs_s"] * scenario.flops_per_image / peak
    if want_sequential if want_sequential is not None else k <= SECONDARY_PATHS_MAX_K:
        add("sequential", measured(setup, lambda: engine(scenario, k, "off", setup)))
    default_eager = setup.cuda and 1 < k <= SECONDARY_PATHS_MAX_K
    if want_fused_eager if want_fused_eager is not None else default_eager:
        # what the graphs add: the same fused runs, kernel by kernel
        add("fused_eager", measured(setup, lambda: engine(scenario, k, "on", setup, cuda_graphs="off")))
    return row


def describe_row(row: dict[str, Any]) -> str:
    def memory(label: str) -> str:
        return f", {row[label + '_peak_memory_gib']:.2f} GiB peak" if f"{label}_peak_memory_gib" in row else ""

    parts = []
    if "fused_total_img_runs_s" in row:
        text = (
            f"fused {row['fused_total_img_runs_s']:9,.0f} img x runs/s ({row['fused_img_s_per_run']:7,.0f} img/s per "
            f"run{memory('fused')})"
        )
        if "fused_vs_plain" in row:
            text += f" = {row['fused_vs_plain']:.2f}x K plain loops"
        if "fused_fraction_of_bf16_peak" in row:
            text += f", {100 * row['fused_fraction_of_bf16_peak']:.2f}% of dense bf16 peak"
        if "fused_warmup_epoch_seconds" in row:
            text += f"; untimed warm-up epoch(s): {', '.join(f'{s:.1f}' for s in row['fused_warmup_epoch_seconds'])} s"
        parts.append(text)
    if "plain_total_img_runs_s" in row:
        parts.append(
            f"K plain loops {row['plain_total_img_runs_s']:9,.0f} img x runs/s ({row['plain_img_s_per_run']:7,.0f} "
            f"img/s per run{memory('plain')})"
        )
    for label, title in (("sequential", "engine sequential"), ("fused_eager", "fused without CUDA graphs")):
        if f"{label}_total_img_runs_s" in row:
            ratio = f" = {row[label + '_vs_plain']:.2f}x" if f"{label}_vs_plain" in row else ""
            parts.append(f"{title} {row[label + '_img_s_per_run']:7,.0f} img/s per run{ratio}{memory(label)}")
    lines = [f"[{row['scenario']}] K={row['K']}: " + " | ".join(parts)]
    for key, value in row.items():
        if key.endswith("_error"):
            lines.append(f"    {key.removesuffix('_error')} failed: {value}")
    for note in row.get("fused_engine_log", []):
        lines.append(f"    engine (fused): {note if len(note) <= 300 else note[:297] + '...'}")
    return "\n".join(lines)


def scenarios_from(values: list[str] | None) -> list[Scenario]:
    names = [name.strip() for value in (values or ["plain"]) for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return [SCENARIOS[name] for name in dict.fromkeys(names)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data", default="", help="npz with train_images/train_labels/... (CUDA mode)")
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME[,NAME]",
        help=f"what the runs train with: {', '.join(SCENARIOS)} (repeatable or comma-separated; default plain)",
    )
    parser.add_argument(
        "--runs",
        default=None,
        help="comma-separated K values (default: 4 on CPU; on CUDA 1,8,16,32,64 for plain and 8 for the others)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per measurement (after the warm-up)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the plain loop")
    parser.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"time the engine's sequential path (default: for K <= {SECONDARY_PATHS_MAX_K})",
    )
    parser.add_argument(
        "--fused-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also time the fused path without CUDA graphs (default: on CUDA for 1 < K <= {SECONDARY_PATHS_MAX_K})",
    )
    parser.add_argument("--json", default="", help="also write the numbers to this file (rewritten after each row)")
    args = parser.parse_args()
    scenarios = scenarios_from(args.scenario)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape, backbone = ("cifar", "resnet32") if cuda else ("mnist", "small_cnn")
    setup = Setup(
        device=device,
        shape=shape,
        path=args.data,
        backbone=backbone,
        epochs=args.epochs or (2 if cuda else 1),
        batch=128,
        precision="bf16" if cuda else "fp32",
        workers=args.workers if args.workers is not None else (8 if cuda else 1),
    )
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(
        f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); {os.cpu_count()} CPU cores; "
        f"backbone {backbone}; batch {setup.batch}; engine precision {setup.precision}; "
        f"data: {args.data or 'synthetic ' + shape + '-shaped'}; {setup.epochs} timed epoch(s) per measurement\n"
        "plain: each plain loop is timed once, as one run (K = 1); K plain loops one after another take K times as "
        "long (the sum over the runs' loops where a scenario's runs differ), and that is the ratio's denominator",
        flush=True,
    )
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "backbone": backbone,
        "batch": setup.batch,
        "precision": setup.precision,
        "data": args.data or f"synthetic {shape}-shaped",
        "timed_epochs": setup.epochs,
        "plain_loop": "timed once per variant with K = 1; K loops = the sum over the K runs",
        "rows": [],
    }
    for scenario in scenarios:
        default_ks = ("1,8,16,32,64" if scenario.name == "plain" else "8") if cuda else "4"
        ks = [int(k) for k in (args.runs or default_ks).split(",")]
        plain_by_variant: dict[str, Measurement] = {}
        for k in ks:
            report["rows"].append({})

            def save(row: dict[str, Any]) -> None:
                report["rows"][-1] = row
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=2))

            row = measure_row(scenario, k, setup, plain_by_variant, args.sequential, args.fused_eager, name, save)
            print(describe_row(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
