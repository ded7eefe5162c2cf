"""``mnist_lt``: a long-tailed split of the 5,000 MNIST digits shipped inside the package.

The data file ``ib_plugins_builtin/data/mnist5k.npz`` (500 images per class) is read through
importlib.resources, so it works from an installed wheel as well as from a checkout; nothing is
ever downloaded.
"""

from __future__ import annotations

import functools
import io
from importlib import resources

import numpy as np

from ib_plugins_builtin.datasets._longtail import check_no_empty_class, long_tail_counts, select_long_tail
from ib_plugins_builtin.datasets._splits import ImageDataset, TensorImageSplit
from ibcore import AugmentSpec, DataError

NUM_CLASSES = 10
IMAGES_PER_CLASS = 500
# The usual MNIST normalisation (mean and std of the full 60k training set); pad 2 + crop, never a
# flip, since a mirrored digit is a different symbol.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_PAD = 2
DATA_FILE = "mnist5k.npz"


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits: uint8 images (5000, 28, 28) and labels (5000,), cached per process."""
    resource = resources.files("ib_plugins_builtin") / "data" / DATA_FILE
    try:
        with np.load(io.BytesIO(resource.read_bytes())) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"The embedded MNIST file {resource} is missing or damaged ({exc}); reinstall ibcore.") from exc
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def build_mnist_lt(
    *, imbalance_ratio: float, imbalance_type: str, test_per_class: int, seed: int, augment: bool
) -> ImageDataset:
    """Hold out ``test_per_class`` images of each class (the first ones in the file) as the balanced test
    split, then draw the long-tailed train split from the rest with ``numpy.random.default_rng(seed)``.

    The test split does not depend on ``seed`` or the imbalance, so every run is scored on the same images.
    """
    images, labels = load_mnist5k()
    test_positions = np.concatenate([np.where(labels == c)[0][:test_per_class] for c in range(NUM_CLASSES)])
    pool = np.setdiff1d(np.arange(len(labels)), test_positions)  # sorted, disjoint from test by construction
    n_max = IMAGES_PER_CLASS - test_per_class
    counts = long_tail_counts(n_max, NUM_CLASSES, imbalance_ratio, imbalance_type)
    where = f"mnist_lt (embedded {DATA_FILE})"
    check_no_empty_class(counts, imbalance_ratio, n_max, where)
    chosen, _ = select_long_tail(labels[pool], counts, method="seeded", seed=seed, where=where)
    train_positions = pool[chosen]

    normalise_only = AugmentSpec(pad=0, flip=False, mean=MNIST_MEAN, std=MNIST_STD)
    cropped = AugmentSpec(pad=MNIST_PAD, flip=False, mean=MNIST_MEAN, std=MNIST_STD)
    train_augment = cropped if augment else normalise_only

    def split(positions: np.ndarray, spec: AugmentSpec) -> TensorImageSplit:
        return TensorImageSplit(images[positions][:, None], labels[positions], NUM_CLASSES, spec, positions)

    return ImageDataset(
        num_classes=NUM_CLASSES,
        train=split(train_positions, train_augment),
        test=split(test_positions, normalise_only),
        val=None,
        class_names=[str(digit) for digit in range(NUM_CLASSES)],
    )
