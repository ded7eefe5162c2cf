"""``cifar10_lt`` / ``cifar100_lt``: long-tailed CIFAR read from the official python-pickle batches.

Layout (the "CIFAR-10/100 python version" from https://www.cs.toronto.edu/~kriz/cifar.html)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    <root>/cifar-100-python/train, test, meta

``root`` may also point at the ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself. The
training images are concatenated in file order (data_batch_1..5), as torchvision's CIFAR10 does, so
``subset_method: cao`` selects the very images LDAM-DRW and BagofTricks-LT train on.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ib_plugins_builtin.datasets._longtail import check_no_empty_class, long_tail_counts, select_long_tail
from ib_plugins_builtin.datasets._splits import ImageDataset, TensorImageSplit
from ibcore import AugmentSpec, DataError

# Normalisation and augmentation of LDAM-DRW (kaidic/LDAM-DRW cifar_train.py) and BagofTricks-LT.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_PAD = 4
IMAGE_BYTES = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and which keys its pickles use."""

    title: str
    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes


CIFAR10 = CifarLayout(
    "CIFAR-10",
    10,
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    b"labels",
    "batches.meta",
    b"label_names",
)
CIFAR100 = CifarLayout(
    "CIFAR-100", 100, "cifar-100-python", ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names"
)


def _expected_layout(layout: CifarLayout, root: Path) -> str:
    files = ", ".join(layout.train_files + layout.test_files)
    return (
        f"expected the {layout.title} python version at {root / layout.folder} (files: {files}), or root pointing "
        f"at that folder itself; get it from https://www.cs.toronto.edu/~kriz/cifar.html or set download: true"
    )


def locate(layout: CifarLayout, root: Path, download: bool) -> Path:
    """The folder holding the batch files: ``root/<folder>`` or ``root`` itself; downloads when asked."""
    for candidate in (root / layout.folder, root):
        if (candidate / layout.train_files[0]).is_file():
            return candidate
    if download:
        _download(layout, root)
        return root / layout.folder
    if not root.exists():
        raise DataError(f"{layout.title} root {root} does not exist; {_expected_layout(layout, root)}.")
    raise DataError(f"{layout.title} not found under {root}: {_expected_layout(layout, root)}.")


def _download(layout: CifarLayout, root: Path) -> None:
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if layout.num_classes == 10 else torchvision.datasets.CIFAR100
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as exc:  # network, disk or checksum failures all mean the same to the user
        raise DataError(f"Downloading {layout.title} into {root} failed: {exc}") from exc


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-rebuilding function, wherever this numpy version keeps it."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct  # type: ignore[no-any-return]


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` limited to latin-1: how pickle protocol 2 written by Python 3 stores ``bytes``."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 rebuilds bytes)")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """An Unpickler that can rebuild only what CIFAR batches hold: dicts, lists, bytes, str, ints, numpy arrays.

    ``pickle.load`` imports and calls any global a file names, so a crafted batch could run code;
    this one refuses every global but numpy's array rebuilding (under both numpy 1 and numpy 2
    module names, so files written by either load) and the latin-1 bytes encoding of protocol 2.
    """

    def __init__(self, handle: BinaryIO, path: Path, layout: CifarLayout) -> None:
        super().__init__(handle, encoding="bytes")  # the official files are Python 2 pickles
        self.path = path
        self.layout = layout

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = ("numpy.core.multiarray", "numpy._core.multiarray")
        if module in reconstruct and name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise DataError(
            f"{self.layout.title} file {self.path} was refused: its pickle asks for {module}.{name}, which a CIFAR "
            "python batch never needs (it holds only dicts, lists, bytes and numpy arrays). Loading it could run "
            "code; replace it with the official file from https://www.cs.toronto.edu/~kriz/cifar.html."
        )


def _unpickle(path: Path, layout: CifarLayout) -> dict[Any, Any]:
    """The dict of one CIFAR python pickle, read with :class:`_CifarUnpickler` so no code in the file can run."""
    try:
        with path.open("rb") as handle:
            content = _CifarUnpickler(handle, path, layout).load()
    except FileNotFoundError:
        raise DataError(f"{layout.title} file {path} is missing; {_expected_layout(layout, path.parent)}.") from None
    except DataError:
        raise
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise DataError(f"{layout.title} file {path} is not a readable CIFAR python batch: {exc}") from exc
    if not isinstance(content, dict):
        raise DataError(f"{layout.title} file {path} holds a {type(content).__name__}, not a CIFAR batch dict.")
    return content


def _get(content: dict[Any, Any], key: bytes) -> Any:
    # Files re-pickled under Python 3 (or read with encoding='latin1') have str keys.
    return content.get(key, content.get(key.decode()))


def read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) of one batch file, labels checked."""
    content = _unpickle(path, layout)
    data, labels = _get(content, b"data"), _get(content, layout.label_key)
    if data is None or labels is None:
        raise DataError(
            f"{layout.title} file {path} lacks the keys b'data' and {layout.label_key!r} of a CIFAR python batch."
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(
            f"{layout.title} file {path}: b'data' must be uint8 of shape (N, {IMAGE_BYTES}), "
            f"got {data.dtype} {data.shape}."
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{layout.title} file {path}: {len(labels)} labels for {len(data)} images.")
    bad = np.flatnonzero((labels < 0) | (labels >= layout.num_classes))
    if len(bad):
        raise DataError(
            f"{layout.title} file {path}: image {bad[0]} has label {labels[bad[0]]}, outside "
            f"[0, {layout.num_classes}) ({len(bad)} such image(s))."
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_split(folder: Path, files: tuple[str, ...], layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batches = [read_batch(folder / name, layout) for name in files]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def read_class_names(folder: Path, layout: CifarLayout) -> list[str] | None:
    """Class names from the meta file, or ``None`` when it is absent (it is not needed to train)."""
    path = folder / layout.meta_file
    if not path.is_file():
        return None
    names = _get(_unpickle(path, layout), layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(
            f"{layout.title} file {path} lacks {layout.num_classes} class names under {layout.names_key!r}."
        )
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def build_cifar_lt(
    layout: CifarLayout,
    *,
    root: str,
    download: bool,
    imbalance_ratio: float,
    imbalance_type: str,
    subset_method: str,
    subset_seed: int,
    augment: bool,
    val_per_class: int,
    max_per_class: int | None,
) -> ImageDataset:
    """Long-tailed train split, balanced official test split, optional balanced val split from unused images."""
    folder = locate(layout, Path(root).expanduser(), download)
    train_images, train_labels = read_split(folder, layout.train_files, layout)
    test_images, test_labels = read_split(folder, layout.test_files, layout)
    where = f"{layout.title} training files in {folder}"
    # n_max as LDAM-DRW computes it: training images / classes (5,000 for CIFAR-10, 500 for CIFAR-100).
    n_max = max_per_class if max_per_class is not None else len(train_labels) // layout.num_classes
    counts = long_tail_counts(n_max, layout.num_classes, imbalance_ratio, imbalance_type)
    check_no_empty_class(counts, imbalance_ratio, n_max, where)
    try:
        chosen, held_out = select_long_tail(
            train_labels, counts, method=subset_method, seed=subset_seed, extra_per_class=val_per_class, where=where
        )
    except DataError as exc:
        if not val_per_class:
            raise
        raise DataError(
            f"{exc} The validation split is carved from the images the long-tailed subset leaves out; the head "
            f"class keeps {counts[0]} of them, so set max_per_class below the images per class (e.g. "
            f"max_per_class: {max(1, n_max - val_per_class)}) or lower val_per_class."
        ) from None

    normalise_only = AugmentSpec(pad=0, flip=False, mean=CIFAR_MEAN, std=CIFAR_STD)
    train_augment = AugmentSpec(pad=CIFAR_PAD, flip=True, mean=CIFAR_MEAN, std=CIFAR_STD) if augment else normalise_only
    num_classes = layout.num_classes
    return ImageDataset(
        num_classes=num_classes,
        train=TensorImageSplit(train_images[chosen], train_labels[chosen], num_classes, train_augment, chosen),
        test=TensorImageSplit(test_images, test_labels, num_classes, normalise_only, np.arange(len(test_labels))),
        val=TensorImageSplit(train_images[held_out], train_labels[held_out], num_classes, normalise_only, held_out)
        if val_per_class
        else None,
        class_names=read_class_names(folder, layout),
    )
