"""``array_file``: a dataset read from the arrays of one ``.npz`` file, optionally cut long-tailed.

File format (``numpy.savez`` / ``savez_compressed``; read with ``allow_pickle=False``, so no object arrays)::

    train_images  uint8 (N, H, W, C), (N, C, H, W) or (N, H, W)   required
    train_labels  integers 0..num_classes-1, shape (N,)          required
    test_images   uint8, same image shape as train_images         required
    test_labels   integers, shape (M,)                            required
    val_images    uint8, same image shape                         optional, with val_labels
    val_labels    integers                                        optional, with val_images
    class_names   strings, one per class                          optional

Any other array in the file (file names, say) is ignored and never read. 4-D arrays are channels last
or channels first (``layout``; ``auto`` takes channels last when the last axis is 1 or 3); 3-D arrays
are single-channel. The splits are tensor splits, so the engine keeps them on the device.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ib_plugins_builtin.datasets._longtail import check_no_empty_class, long_tail_counts, select_long_tail
from ib_plugins_builtin.datasets._splits import ImageDataset, TensorImageSplit
from ibcore import AugmentSpec, DataError

REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")
SPLITS = ("train", "val", "test")


class _Archive:
    """The arrays of one npz file, each read (and checked for pickles) only when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise DataError(f"array_file {path} does not exist; give the path of a .npz file (see numpy.savez).")
        if not path.is_file():
            raise DataError(f"array_file {path} is not a file; give the path of a .npz file (see numpy.savez).")
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError:  # np.load found a pickle (refused without allow_pickle) or no format it knows
            raise DataError(
                f"array_file {path} is not an .npz archive of arrays (nor a .npy array): numpy could only read it "
                f"as a pickle, which is never loaded since it could run code; write the arrays with numpy.savez."
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"array_file {path} is not a readable .npz archive: {exc}") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                f"array_file {path} holds a single array (a .npy file), not an .npz archive of named arrays; "
                f"write it with numpy.savez(path, train_images=..., train_labels=..., test_images=..., "
                f"test_labels=...)."
            )
        self.npz = loaded
        self.names = set(loaded.files)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.npz[name])
        except ValueError as exc:
            if "allow_pickle" not in str(exc):  # a malformed .npy header inside the archive
                raise DataError(f"array_file {self.path}: array '{name}' cannot be read: {exc}") from None
            raise DataError(  # an object array: loading it would unpickle
                f"array_file {self.path}: array '{name}' holds Python objects (a pickled object array), which "
                f"are never loaded; store images and labels as numeric arrays and class_names as "
                f"np.array(names, dtype=str)."
            ) from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"array_file {self.path}: array '{name}' cannot be read (damaged file?): {exc}") from None

    def close(self) -> None:
        self.npz.close()


def _check_arrays_present(archive: _Archive) -> None:
    missing = [name for name in REQUIRED if name not in archive]
    if missing:
        present = ", ".join(sorted(archive.names)) or "none"
        raise DataError(
            f"array_file {archive.path} lacks the required array(s) {', '.join(missing)}; it holds: {present}. "
            f"Required: {', '.join(REQUIRED)} (optional: val_images + val_labels, class_names)."
        )
    has_images, has_labels = "val_images" in archive, "val_labels" in archive
    if has_images != has_labels:
        present_name, missing_name = ("val_images", "val_labels") if has_images else ("val_labels", "val_images")
        raise DataError(
            f"array_file {archive.path} has '{present_name}' but no '{missing_name}'; give both or neither."
        )


def _resolve_layout(images: np.ndarray, layout: str) -> str:
    """'nhwc' or 'nchw' for a 4-D array (``auto``: channels last when the last axis is 1 or 3)."""
    if layout != "auto":
        return layout
    return "nhwc" if images.shape[-1] in (1, 3) else "nchw"


def _as_nchw(archive: _Archive, name: str, images: np.ndarray, layout: str) -> np.ndarray:
    """Array ``name`` (already read) as uint8 (N, C, H, W); ``layout`` of 4-D arrays: 'nhwc', 'nchw' or 'auto'."""
    where = f"array_file {archive.path}: array '{name}'"
    if images.dtype != np.uint8:
        raise DataError(
            f"{where} must be uint8 (pixel values 0..255), got {images.dtype}; convert it, e.g. "
            f"(images * 255).round().astype(np.uint8) for floats in 0..1."
        )
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if _resolve_layout(images, layout) == "nhwc":
            images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{where} has shape {images.shape} ({images.ndim}-D); images must be (N, H, W, C), (N, C, H, W) or "
            f"(N, H, W) for single-channel images."
        )
    if len(images) == 0:
        raise DataError(f"{where} holds no images.")
    if min(images.shape[1:]) == 0:
        raise DataError(f"{where} has an empty axis: shape {images.shape}.")
    return np.ascontiguousarray(images)


def _read_labels(archive: _Archive, name: str, count: int, images_name: str) -> np.ndarray:
    """int64 labels (N,) of array ``name``, checked against ``count`` images."""
    labels = archive[name]
    where = f"array_file {archive.path}: array '{name}'"
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{where} must hold integer class indices 0..C-1, got {labels.dtype}; convert it with "
            f".astype(np.int64) if the values are whole numbers."
        )
    if labels.ndim != 1:
        raise DataError(f"{where} must be 1-D (one label per image), got shape {labels.shape}.")
    if len(labels) != count:
        raise DataError(f"{where} has {len(labels)} labels for the {count} images of '{images_name}'.")
    if labels.dtype == np.uint64 and len(labels) and labels.max() > np.iinfo(np.int64).max:
        raise DataError(f"{where} holds label {labels.max()}, far outside any class range.")
    return labels.astype(np.int64)


def _read_class_names(archive: _Archive) -> list[str] | None:
    if "class_names" not in archive:
        return None
    names = archive["class_names"]
    if names.dtype.kind not in "US" or names.ndim != 1:
        raise DataError(
            f"array_file {archive.path}: array 'class_names' must be a 1-D array of strings, got {names.dtype} "
            f"{names.shape}; write it as np.array(names, dtype=str)."
        )
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names.tolist()]


def _check_no_negative_label(path: Path, split: str, labels: np.ndarray) -> None:
    negative = np.flatnonzero(labels < 0)
    if len(negative):
        first = int(negative[0])
        raise DataError(
            f"array_file {path}: array '{split}_labels' gives image {first} of the {split} split the negative "
            f"class index {labels[first]} ({len(negative)} negative label(s) in the {split} split); labels are "
            f"class indices 0..C-1."
        )


def _check_label_range(path: Path, split: str, labels: np.ndarray, num_classes: int, source: str) -> None:
    bad = np.flatnonzero(labels >= num_classes)
    if len(bad):
        first = int(bad[0])
        raise DataError(
            f"array_file {path}: array '{split}_labels' gives image {first} of the {split} split the class index "
            f"{labels[first]}, outside 0..{num_classes - 1} ({num_classes} classes from {source}); {len(bad)} such "
            f"label(s) in the {split} split."
        )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population, as numpy's) of uint8 (N, C, H, W) images scaled to 0..1.

    Computed exactly in float64 from a 256-bin histogram per channel, without a float copy of the images.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        histogram = np.bincount(images[:, channel].reshape(-1), minlength=256).astype(np.float64)
        total = histogram.sum()
        mean = float((histogram * values).sum() / total)
        variance = float((histogram * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(variance**0.5)
    return tuple(means), tuple(stds)


def _normalisation(
    path: Path, images: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = images.shape[1]
    for name, given in (("mean", mean), ("std", std)):
        if given is not None and len(given) != channels:
            raise DataError(
                f"array_file {path}: {name} has {len(given)} value(s) but the images in 'train_images' have "
                f"{channels} channel(s); give one {name} per channel."
            )
    computed_mean, computed_std = _channel_stats(images) if mean is None or std is None else ((), ())
    if std is None:
        flat = [c for c, value in enumerate(computed_std) if value == 0.0]
        if flat:
            raise DataError(
                f"array_file {path}: channel {flat[0]} of the training images in 'train_images' is constant "
                f"(std 0), so it cannot be normalised; give std explicitly."
            )
    return (
        tuple(float(v) for v in mean) if mean is not None else computed_mean,
        tuple(float(v) for v in std) if std is not None else computed_std,
    )


def build_array_file(
    *,
    path: str,
    layout: str,
    num_classes: int | None,
    imbalance_ratio: float | None,
    imbalance_type: str,
    subset_method: str,
    subset_seed: int,
    max_per_class: int | None,
    val_per_class: int,
    augment: bool,
    pad: int,
    flip: bool,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> ImageDataset:
    """Train/test (and val) tensor splits from the arrays of ``path``; a long-tailed cut of the training
    arrays when ``imbalance_ratio`` is set; mean/std from the (cut) training images unless given.
    """
    file = Path(path).expanduser()
    archive = _Archive(file)
    try:
        _check_arrays_present(archive)
        splits = [split for split in SPLITS if f"{split}_images" in archive]
        raw = {split: archive[f"{split}_images"] for split in splits}
        # One layout for every split, decided on the training images (auto decides per array only when
        # the training images are 3-D and so say nothing about the axis order).
        order = _resolve_layout(raw["train"], layout) if raw["train"].ndim == 4 else layout
        images = {split: _as_nchw(archive, f"{split}_images", raw.pop(split), order) for split in splits}
        labels = {
            split: _read_labels(archive, f"{split}_labels", len(images[split]), f"{split}_images") for split in splits
        }
        class_names = _read_class_names(archive)
    finally:
        archive.close()
    has_val = "val" in images

    image_shape = images["train"].shape[1:]
    for split in ("test", "val"):
        if split in images and images[split].shape[1:] != image_shape:
            raise DataError(
                f"array_file {file}: array '{split}_images' holds images of shape (C, H, W) = "
                f"{images[split].shape[1:]} but 'train_images' holds {image_shape} (layout {order!r}); every "
                f"split needs the same image size and channels."
            )

    for split, split_labels in labels.items():
        _check_no_negative_label(file, split, split_labels)
    if num_classes is not None:
        source = "num_classes"
    elif class_names is not None:
        num_classes, source = len(class_names), "len(class_names)"
    else:
        num_classes, source = max(int(split_labels.max()) for split_labels in labels.values()) + 1, "max label + 1"
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(
            f"array_file {file}: array 'class_names' holds {len(class_names)} names but num_classes is "
            f"{num_classes}; give one name per class."
        )
    for split, split_labels in labels.items():
        _check_label_range(file, split, split_labels, num_classes, source)

    train_counts = np.bincount(labels["train"], minlength=num_classes)
    empty = [c for c in range(num_classes) if train_counts[c] == 0]
    if empty:
        named = f" ({class_names[empty[0]]!r})" if class_names is not None else ""
        raise DataError(
            f"array_file {file}: array 'train_labels' has no training image of class {empty[0]}{named} "
            f"({len(empty)} class(es) without training images: {empty[:10]}); every class 0..{num_classes - 1} "
            f"needs at least one."
        )

    train_positions = np.arange(len(labels["train"]), dtype=np.int64)
    val_positions: np.ndarray | None = None
    if imbalance_ratio is not None:
        if val_per_class and has_val:
            raise DataError(
                f"array_file {file} already has 'val_images' and 'val_labels'; val_per_class would carve a second "
                f"validation split. Set val_per_class: 0 to use the file's, or drop those arrays."
            )
        where = f"array_file {file} ('train_labels')"
        n_max = max_per_class if max_per_class is not None else int(train_counts.min())
        counts = long_tail_counts(n_max, num_classes, imbalance_ratio, imbalance_type)
        check_no_empty_class(counts, imbalance_ratio, n_max, where)
        try:
            train_positions, held_out = select_long_tail(
                labels["train"],
                counts,
                method=subset_method,
                seed=subset_seed,
                extra_per_class=val_per_class,
                where=where,
            )
        except DataError as exc:
            if not val_per_class:
                raise
            n_max_from = "max_per_class" if max_per_class is not None else "the smallest class count of the file"
            raise DataError(
                f"{exc} The validation split is carved from the images the long-tailed cut leaves out, and the cut "
                f"keeps up to n_max = {n_max} images per class ({n_max_from}); set max_per_class lower (e.g. "
                f"max_per_class: {max(1, n_max - val_per_class)}) or lower val_per_class."
            ) from None
        if val_per_class:
            val_positions = held_out
        train_images, train_labels = images["train"][train_positions], labels["train"][train_positions]
    else:
        train_images, train_labels = images["train"], labels["train"]

    mean_values, std_values = _normalisation(file, train_images, mean, std)
    normalise_only = AugmentSpec(pad=0, flip=False, mean=mean_values, std=std_values)
    train_augment = AugmentSpec(pad=pad, flip=flip, mean=mean_values, std=std_values) if augment else normalise_only

    def whole(split: str) -> TensorImageSplit:
        positions = np.arange(len(labels[split]), dtype=np.int64)
        return TensorImageSplit(images[split], labels[split], num_classes, normalise_only, positions)

    val: TensorImageSplit | None = None
    if val_positions is not None:
        val_images, val_labels = images["train"][val_positions], labels["train"][val_positions]
        val = TensorImageSplit(val_images, val_labels, num_classes, normalise_only, val_positions)
    elif has_val:
        val = whole("val")
    return ImageDataset(
        num_classes=num_classes,
        train=TensorImageSplit(train_images, train_labels, num_classes, train_augment, train_positions),
        test=whole("test"),
        val=val,
        class_names=class_names,
    )
