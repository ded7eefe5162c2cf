"""Batches for the training and evaluation loops: device-resident tensors or a DataLoader.

A split that offers ``tensors()`` and an :class:`~ibcore.AugmentSpec` lives on the device as uint8;
its random crop, flip and normalisation run there per sample, in batch. Larger splits keep the
DataLoader path with workers (persistent across epochs), read through the split's :class:`BatchReader`
when it offers one (``image_list`` / ``image_folder`` with ``decode: torchvision`` decode on the device).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ibcore.errors import DataError, IbError
from ibcore.protocols import AugmentSpec, is_tensor_split


@functools.lru_cache(maxsize=32)
def _normalisation(spec: AugmentSpec, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and std as (1, C, 1, 1) tensors on ``device``, made once (a copy per batch would sync)."""
    mean = torch.tensor(spec.mean, dtype=dtype).view(1, -1, 1, 1).to(device)
    std = torch.tensor(spec.std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return mean, std


def augment_batch(
    images: Tensor,
    spec: AugmentSpec,
    generator: torch.Generator | None,
    train: bool,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """uint8 (N, C, H, W) → float, with a per-sample random crop and flip when ``train``, normalised."""
    return normalise(crop_and_flip(images, spec, generator, train, shard), spec)


def normalise(x: Tensor, spec: AugmentSpec) -> Tensor:
    """Pixel values 0..255 (float) → ``(x / 255 - mean) / std`` per channel."""
    mean, std = _normalisation(spec, x.device, x.dtype)
    return (x / 255.0 - mean) / std


def crop_and_flip(
    images: Tensor,
    spec: AugmentSpec,
    generator: torch.Generator | None,
    train: bool,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """uint8 (N, C, H, W) → float pixel values (0..255), with a per-sample random crop and flip when ``train``.

    Each sample draws its own crop offset and flip (torchvision.transforms.v2 on a batch would draw
    one crop for the whole batch). With ``shard=(rank, world)`` the batch is rank ``rank``'s slice
    (positions ``rank::world``) of a global batch of ``N * world``: the draws are made for the whole
    global batch and the slice's rows kept, so a data-parallel run augments every sample exactly as
    a single process with the same global batch does.
    """
    x = images.to(torch.get_default_dtype())  # float32 unless a test asks for float64
    n, _, h, w = x.shape
    rank, world = shard
    draws = n * world

    def pick(values: Tensor) -> Tensor:
        return values if world == 1 else values[rank::world]

    if train and spec.pad > 0:
        padded = F.pad(x, (spec.pad, spec.pad, spec.pad, spec.pad))
        span = 2 * spec.pad + 1
        oy = pick(torch.randint(0, span, (draws,), generator=generator, device=images.device))
        ox = pick(torch.randint(0, span, (draws,), generator=generator, device=images.device))
        rows = (oy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=images.device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if train and spec.flip:
        flip = pick(torch.rand(draws, generator=generator, device=images.device)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class DeviceData:
    """A tensor split kept on ``device`` as uint8; batches are gathered and augmented there."""

    def __init__(self, split: Any, device: torch.device) -> None:
        images, labels = split.tensors()
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.augment: AugmentSpec = split.augment
        self.device = device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(
        self, indices: Tensor, generator: torch.Generator | None, train: bool, shard: tuple[int, int] = (0, 1)
    ) -> tuple[Tensor, Tensor]:
        return augment_batch(self.images[indices], self.augment, generator, train, shard), self.labels[indices]

    def iterate(
        self,
        order: np.ndarray,
        batch_size: int,
        generator: torch.Generator | None,
        train: bool,
        drop_last: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``order``; ``shard=(rank, world)``: ``order`` is one rank's slice (see :func:`augment_batch`)."""
        for x, y, _ in self.iterate_pixels(order, batch_size, generator, train, drop_last, shard):
            yield normalise(x, self.augment), y

    def iterate_pixels(
        self,
        order: np.ndarray,
        batch_size: int,
        generator: torch.Generator | None,
        train: bool,
        drop_last: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """As :meth:`iterate`, before normalisation: float pixel values 0..255, cropped and flipped, the targets,
        and the batch's uint8 images as stored (an extra view crops them anew)."""
        index = torch.as_tensor(order, dtype=torch.long, device=self.device)
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            images = self.images[chunk]
            yield crop_and_flip(images, self.augment, generator, train, shard), self.labels[chunk], images


class BatchReader(Protocol):
    """How a split is read through the DataLoader: ``item`` and ``collate`` in the workers, ``to_device`` here.

    A split offers one with ``batch_reader(device) -> BatchReader | None`` (None, or no such method: the
    default, :class:`SplitItems`). Every random draw of ``item`` must come from its ``seed``: that makes a
    batch a function of the sampler's order and the epoch's generator only, whatever the number of workers.
    """

    #: whether batches are worth copying to page-locked memory for a CUDA device
    pin_memory: bool
    #: batches each worker keeps ready
    prefetch_factor: int

    def item(self, index: int, seed: int) -> Any: ...

    def collate(self, items: list[Any]) -> Any: ...

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]: ...


class SplitItems:
    """The default :class:`BatchReader`: ``split[index]`` with torch's, numpy's and Python's global generators
    seeded by the sample's seed (what torchvision's transforms draw from), collated by torch."""

    pin_memory = True
    prefetch_factor = 2

    def __init__(self, split: Any) -> None:
        self.split = split

    def item(self, index: int, seed: int) -> Any:
        with _global_generators_seeded(seed):
            return self.split[index]

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        x, y = batch
        return x.to(device, non_blocking=True), torch.as_tensor(y).to(device, dtype=torch.long)


@contextlib.contextmanager
def _global_generators_seeded(seed: int) -> Iterator[None]:
    """The global generators seeded with ``seed``; in the training process (no workers) restored afterwards,
    so reading data never moves the stream dropout and the model draw from."""
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class _ReaderItems(torch.utils.data.Dataset[Any]):
    """The DataLoader's dataset: a ``(index, seed)`` key read by the :class:`BatchReader`."""

    def __init__(self, reader: BatchReader) -> None:
        self.reader = reader

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.reader.item(*key)


class _PassBatches:
    """The batch sampler of a persistent DataLoader: the batches of the pass under way, set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LoaderData:
    """A split read through a DataLoader, its images decoded in workers (or, as the split's reader says, on
    the device).

    Workers persist across epochs: each pass hands an idle DataLoader its batches. Passes that run at the
    same time (the seeds of a lane share one split and step in lockstep) each take a DataLoader of their own.
    """

    def __init__(self, split: Any, device: torch.device, num_workers: int) -> None:
        self.split = split
        self.device = device
        self.num_workers = num_workers
        offered = split.batch_reader(device) if callable(getattr(split, "batch_reader", None)) else None
        self.reader: BatchReader = offered if offered is not None else SplitItems(split)
        self._idle: list[torch.utils.data.DataLoader[Any]] = []

    def __len__(self) -> int:
        return len(self.split)

    def iterate(
        self,
        order: np.ndarray,
        batch_size: int,
        generator: torch.Generator | None,
        train: bool,
        drop_last: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``order``; each sample's random draws are seeded from ``generator`` (None, for evaluation:
        by its index). The split's own transforms augment, so ``shard`` is not used: a distributed run seeds
        ``generator`` per rank."""
        indices = np.asarray(order, dtype=np.int64).tolist()
        if generator is not None:
            seeds = torch.randint(0, 2**62, (len(indices),), generator=generator, device=generator.device).tolist()
        else:
            seeds = indices
        keys = list(zip(indices, seeds, strict=True))
        batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        if not batches:
            return
        loader = self._idle.pop() if self._idle else self._loader()
        loader.batch_sampler.batches = batches  # type: ignore[union-attr]
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self._idle.append(loader)
                return
            except IbError as exc:  # the loader is dropped: its workers end with it
                raise _without_worker_traceback(exc) from None
            try:
                yield self.reader.to_device(batch, self.device)
            except GeneratorExit:  # the consumer stopped early (a smoke run): the next pass resets the loader
                self._idle.append(loader)
                raise

    def _loader(self) -> torch.utils.data.DataLoader[Any]:
        workers = self.num_workers
        return torch.utils.data.DataLoader(
            _ReaderItems(self.reader),
            batch_sampler=_PassBatches(),
            num_workers=workers,
            collate_fn=self.reader.collate,
            pin_memory=self.device.type == "cuda" and self.reader.pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=self.reader.prefetch_factor if workers > 0 else None,
            # its own generator (the workers' base seed): starting a pass draws nothing from torch's global one
            generator=torch.Generator().manual_seed(0),
        )


def _without_worker_traceback(exc: IbError) -> IbError:
    """A DataLoader worker's error re-raised with its message only (torch embeds the worker's traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = text.strip().splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    message = last[len(prefix) :] if last.startswith(prefix) else last.split(": ", 1)[-1]
    try:
        return type(exc)(message)
    except TypeError:  # an error type with another constructor: keep it whole
        return exc


def make_data(
    split: Any, device: torch.device, mode: str, num_workers: int, where: str = "the data set"
) -> DeviceData | LoaderData:
    """Device-resident data when the split allows it and ``mode`` is not "off"; with "on", it must allow it."""
    if mode != "off" and is_tensor_split(split):
        return DeviceData(split, device)
    if mode == "on":
        raise DataError(
            f"trainer.data_on_device is 'on', but {where} cannot be kept on the device: it offers no tensors() "
            "with an AugmentSpec (data sets read from image files go through a DataLoader). Use 'auto' to fall "
            "back to the DataLoader, or 'off'."
        )
    return LoaderData(split, device, num_workers)
