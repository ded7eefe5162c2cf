"""The data of an experiment: its dataset built once, or once per seed when the dataset draws from it.

A dataset that draws a subset declares a ``subset_seed`` param; left unset, it follows the run's seed
(``BuildContext.seed``). Runs repeated over seeds then each train on their own seed's subset, exactly
as separate experiments would; every other dataset is built once and shared by all seeds.

:func:`fingerprint` summarises the data a run trains on (class counts, split sizes, a hash of the
labels in order, a hash of a sample of the image bytes of splits held as tensors), without decoding an
image; ``ib resume`` compares it with the one stored when the run started (:func:`check_same_data`), so
a resume that finds other data — a relative root resolved from another working directory, files
changed since — stops instead of training on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Literal

import numpy as np
import torch

from ibcore.build import build
from ibcore.config.schema import Experiment
from ibcore.context import BuildContext
from ibcore.engine.batches import DeviceData, LoaderData, make_data
from ibcore.engine.seeding import derive_seed
from ibcore.errors import DataError
from ibcore.registry import resolve


@dataclasses.dataclass
class SeedData:
    """One built dataset: what components may know about it, and its splits ready for the loops."""

    context: BuildContext  # num_classes, class_counts, targets; the seed it was drawn with
    train: DeviceData | LoaderData
    test: DeviceData | LoaderData
    val: DeviceData | LoaderData | None

    @property
    def num_classes(self) -> int:
        assert self.context.num_classes is not None
        return self.context.num_classes

    @property
    def class_counts(self) -> list[int]:
        return list(self.context.class_counts or ())


def follows_seed(experiment: Experiment) -> bool:
    """Whether the dataset's subset draw follows the run's seed (a ``subset_seed`` param left unset)."""
    spec = experiment.data.dataset
    params_model = resolve("dataset", spec.name).params
    if params_model is None or "subset_seed" not in params_model.model_fields:
        return False
    return getattr(params_model.model_validate(spec.params), "subset_seed", None) is None


def load_data(
    experiment: Experiment, seeds: list[int], device: torch.device, base: BuildContext
) -> dict[int, SeedData]:
    """The data each seed trains on: one build per seed when the dataset follows the seed, else one for all."""
    if follows_seed(experiment) and len(seeds) > 1:
        return {seed: _build(experiment, seed, device, base) for seed in seeds}
    shared = _build(experiment, seeds[0], device, base)
    return dict.fromkeys(seeds, shared)


#: ``num_workers: auto`` starts at most this many workers per training process, so a many-core node does not
#: start dozens of processes per split (each holds a copy of the file list and its prefetched batches)
AUTO_WORKERS_CAP = 8


def loader_workers(setting: int | Literal["auto"]) -> int:
    """DataLoader workers for ``data.num_workers``: the number given, or for ``auto`` one per CPU this process
    may run on (its affinity; torchrun's ``LOCAL_WORLD_SIZE`` processes on a node share them), at most
    :data:`AUTO_WORKERS_CAP`."""
    if setting != "auto":
        return setting
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(usable // processes, AUTO_WORKERS_CAP))


def _build(experiment: Experiment, seed: int, device: torch.device, base: BuildContext) -> SeedData:
    spec = experiment.data.dataset
    context = base.replace(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dataset"))  # for a dataset that draws from torch's global stream
        dataset = build("dataset", spec.name, spec.params, context=context)
    train = dataset.train
    num_classes = int(dataset.num_classes)
    counts = [int(c) for c in train.class_counts]
    if len(counts) != num_classes:
        raise DataError(f"dataset {spec.name!r} reports {len(counts)} class counts for {num_classes} classes")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"dataset {spec.name!r}: classes {empty} have no training images")
    mode, workers = experiment.trainer.data_on_device, loader_workers(experiment.data.num_workers)
    where = f"the {{}} split of dataset {spec.name!r}"
    val: Any = getattr(dataset, "val", None)
    return SeedData(
        context=context.replace(num_classes=num_classes, class_counts=tuple(counts), targets=train.targets),
        train=make_data(train, device, mode, workers, where.format("training")),
        test=make_data(dataset.test, device, mode, workers, where.format("test")),
        val=None if val is None else make_data(val, device, mode, workers, where.format("validation")),
    )


# --------------------------------------------------------------------------------------------
# Fingerprint: is the data found by `ib resume` the data the run started with?

#: bump when the fingerprint's content changes: fingerprints of another version are not compared
FINGERPRINT_VERSION = 1
#: images hashed per tensor split (evenly spaced over the split, first and last included)
SAMPLED_IMAGES = 256


def _labels(split: DeviceData | LoaderData) -> np.ndarray:
    if isinstance(split, DeviceData):
        return split.labels.detach().cpu().numpy().astype("<i8", copy=False)
    return np.asarray(split.split.targets, dtype="<i8")


def _split_fingerprint(split: DeviceData | LoaderData) -> dict[str, Any]:
    labels = _labels(split)
    found: dict[str, Any] = {
        "images": len(labels),
        "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
    }
    if isinstance(split, DeviceData) and len(split) > 0:
        # a few hundred images' bytes: catches other pixels under the same labels, in microseconds
        picks = torch.as_tensor(np.unique(np.linspace(0, len(split) - 1, SAMPLED_IMAGES).round().astype(np.int64)))
        sample = split.images[picks.to(split.images.device)].detach().cpu().contiguous()
        digest = hashlib.sha256(str((sample.dtype, tuple(split.images.shape))).encode())
        digest.update(sample.numpy().tobytes())
        found["sampled_images_sha256"] = digest.hexdigest()
    return found


def fingerprint(data: SeedData) -> dict[str, Any]:
    """A small JSON-able summary of ``data`` that changes when the data set does; no image is decoded.

    Class counts and the number of images of each split, a SHA-256 of each split's labels in order,
    and, for splits kept as tensors, a SHA-256 of ``SAMPLED_IMAGES`` images' bytes. Stored in the run
    directory at ``ib run``, compared by :func:`check_same_data` at ``ib resume``.
    """
    return {
        "version": FINGERPRINT_VERSION,
        "num_classes": data.num_classes,
        "class_counts": data.class_counts,
        "train": _split_fingerprint(data.train),
        "test": _split_fingerprint(data.test),
        "val": None if data.val is None else _split_fingerprint(data.val),
    }


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    found = []
    for key, what in (("num_classes", "classes"), ("class_counts", "training images per class")):
        if saved.get(key) != now.get(key):
            found.append(f"{what}: {_short(saved.get(key))} when the run started, {_short(now.get(key))} now")
    for split in ("train", "test", "val"):
        before, after = saved.get(split), now.get(split)
        if before is None and after is None:
            continue
        if not isinstance(before, dict) or not isinstance(after, dict):
            then, later = ("present" if isinstance(v, dict) else "absent" for v in (before, after))
            found.append(f"{split} split: {then} when the run started, {later} now")
            continue
        if before.get("images") != after.get("images"):
            found.append(
                f"{split} split: {before.get('images')} images when the run started, {after.get('images')} now"
            )
        elif before.get("labels_sha256") != after.get("labels_sha256"):
            found.append(f"{split} split: the same number of images, but other labels or another order")
        elif (
            "sampled_images_sha256" in before
            and "sampled_images_sha256" in after
            and before["sampled_images_sha256"] != after["sampled_images_sha256"]
        ):
            found.append(f"{split} split: the same labels, but other image bytes")
    return found


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_data(saved: Any, now: dict[str, Any], run_dir: str | os.PathLike[str]) -> None:
    """Raise a :class:`DataError` saying what differs when ``now`` (this resume's data) is not ``saved``.

    ``saved`` is the :func:`fingerprint` stored when the run started; a missing one (a run of an older
    ibcore) or one of another :data:`FINGERPRINT_VERSION` cannot be compared and is accepted.
    """
    if not isinstance(saved, dict) or saved.get("version") != FINGERPRINT_VERSION:
        return
    differences = _differences(saved, now)
    if not differences:
        return
    run_dir = os.fspath(run_dir)
    raise DataError(
        f"the data set found when resuming {run_dir} is not the one the run started with: "
        + "; ".join(differences)
        + f". Resuming would continue training on other data. Check the dataset's paths in {run_dir}/config.yaml "
        "(they must name the data the run started with) and that its files were not changed or moved; to "
        "train on the data as it is now, start a new run with `ib run`."
    )


def fingerprints(data: dict[int, SeedData]) -> dict[str, Any]:
    """Per seed, the :func:`fingerprint` of its data (what meta.json keeps)."""
    return {str(seed): fingerprint(seed_data) for seed, seed_data in data.items()}


def check_same_seed_data(saved: Any, now: dict[str, Any], run_dir: str | os.PathLike[str]) -> None:
    """:func:`check_same_data` for every seed of :func:`fingerprints` (``saved`` None: an older run, accepted)."""
    if isinstance(saved, dict):
        for seed, fingerprint_now in now.items():
            check_same_data(saved.get(seed), fingerprint_now, run_dir)
