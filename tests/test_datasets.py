"""Built-in datasets: long-tailed counts, subsets, splits, augmentation and the errors a user can cause.

Every fixture is written into tmp_path in the real on-disk format (CIFAR python pickles, JPEG files,
list files); nothing is downloaded.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ibcore
from ib_plugins_builtin.datasets._longtail import long_tail_counts
from ibcore import AugmentSpec, BuildContext, ConfigError, DataError
from ibcore.protocols import is_tensor_split

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # LDAM-DRW cifar_train.py
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def build_dataset(name: str, context: BuildContext | None = None, **params: object) -> object:
    return ibcore.build("dataset", name, params, context=context or BuildContext())


def normalised(images_uint8: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """(x/255 - mean)/std per channel, the normalisation AugmentSpec documents."""
    channels = images_uint8.shape[-3]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(channels, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(channels, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------------------------
# Fixtures in the official CIFAR python-pickle format


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    """One batch as the originals store it: a protocol-2 pickle of a dict with bytes keys."""
    content = {
        b"batch_label": b"fixture batch",
        label_key: [int(label) for label in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def make_cifar10(root: Path, per_class: int = 20, test_per_class: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    """A tiny CIFAR-10 in ``root/cifar-10-batches-py``: five train batches (labels shuffled), test_batch, meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for batch, (image_part, label_part) in enumerate(
        zip(np.array_split(images, 5), np.array_split(labels, 5), strict=True), 1
    ):
        write_cifar_batch(folder / f"data_batch_{batch}", image_part, label_part, b"labels")
    test_labels = np.tile(np.arange(10), test_per_class)
    test_images = rng.integers(0, 256, size=(len(test_labels), 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_images, test_labels, b"labels")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, handle, protocol=2)
    return {"images": images, "labels": labels, "test_images": test_images, "test_labels": test_labels}


def make_cifar100(folder: Path, per_class: int = 5) -> np.ndarray:
    """A tiny CIFAR-100 directly in ``folder`` (train/test with b'fine_labels'); returns train labels."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    labels = rng.permutation(np.repeat(np.arange(100), per_class))
    write_cifar_batch(
        folder / "train", rng.integers(0, 256, (len(labels), 3, 32, 32), np.uint8), labels, b"fine_labels"
    )
    test_labels = np.arange(100)
    write_cifar_batch(folder / "test", rng.integers(0, 256, (100, 3, 32, 32), np.uint8), test_labels, b"fine_labels")
    return labels


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, make_cifar10(tmp_path)


# --------------------------------------------------------------------------------------------
# Counts against the reference numbers


# Source: /work/shared/reference/vectors.json "cifar10_lt_counts" (n_i = int(5000 * (1/IF)^(i/9)), LDAM-DRW).
CIFAR10_LT_COUNTS = {
    200: [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    20: [5000, 3584, 2569, 1842, 1320, 946, 678, 486, 348, 250],
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
}
# Source: vectors.json "cifar100_lt_totals" and "cifar100_lt_counts_if100_head_tail".
CIFAR100_LT_TOTALS = {200: 9502, 100: 10847, 50: 12608, 20: 15907, 10: 19573}
CIFAR100_IF100_HEAD5 = [500, 477, 455, 434, 415]
CIFAR100_IF100_TAIL5 = [6, 5, 5, 5, 5]


@pytest.mark.parametrize("ratio", sorted(CIFAR10_LT_COUNTS))
def test_cifar10_lt_counts_match_reference(ratio: int) -> None:
    assert long_tail_counts(5000, 10, ratio, "exp") == CIFAR10_LT_COUNTS[ratio]


@pytest.mark.parametrize("ratio", sorted(CIFAR100_LT_TOTALS))
def test_cifar100_lt_totals_match_reference(ratio: int) -> None:
    assert sum(long_tail_counts(500, 100, ratio, "exp")) == CIFAR100_LT_TOTALS[ratio]


def test_cifar100_lt_head_and_tail_match_reference() -> None:
    counts = long_tail_counts(500, 100, 100, "exp")
    assert counts[:5] == CIFAR100_IF100_HEAD5
    assert counts[-5:] == CIFAR100_IF100_TAIL5


def test_step_imbalance_halves_the_classes() -> None:
    assert long_tail_counts(5000, 10, 10, "step") == [5000] * 5 + [500] * 5
    assert long_tail_counts(400, 10, 1, "exp") == [400] * 10


# --------------------------------------------------------------------------------------------
# mnist_lt (the embedded data set)

# n_i = int(400 * (1/10)^(i/9)): the exp formula above with the 400-image pool left after 100 test images.
MNIST_LT_IR10 = [400, 309, 239, 185, 143, 111, 86, 66, 51, 40]


def test_mnist_lt_defaults_long_tailed_train_balanced_test() -> None:
    dataset = build_dataset("mnist_lt")
    assert dataset.num_classes == 10 and dataset.val is None
    assert dataset.class_names == [str(d) for d in range(10)]
    assert dataset.train.class_counts == MNIST_LT_IR10
    assert np.bincount(dataset.train.targets).tolist() == MNIST_LT_IR10
    assert dataset.test.class_counts == [100] * 10
    assert dataset.train.targets.dtype == np.int64 and len(dataset.train) == sum(MNIST_LT_IR10)
    images, labels = dataset.train.tensors()
    assert images.shape == (sum(MNIST_LT_IR10), 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == dataset.train.targets.tolist()
    assert is_tensor_split(dataset.train) and is_tensor_split(dataset.test)


def test_mnist_lt_train_and_test_never_overlap() -> None:
    dataset = build_dataset("mnist_lt", imbalance_ratio=1.0, test_per_class=50)
    assert dataset.train.class_counts == [450] * 10 and dataset.test.class_counts == [50] * 10
    assert not set(dataset.train.source_indices.tolist()) & set(dataset.test.source_indices.tolist())
    train_bytes = {image.numpy().tobytes() for image in dataset.train.tensors()[0]}
    test_bytes = {image.numpy().tobytes() for image in dataset.test.tensors()[0]}
    assert not train_bytes & test_bytes


def test_mnist_lt_subset_seed_draws_another_train_subset_on_the_same_test_split() -> None:
    first, again, other = (build_dataset("mnist_lt", subset_seed=s) for s in (0, 0, 1))
    assert np.array_equal(first.train.source_indices, again.train.source_indices)
    assert not np.array_equal(first.train.source_indices, other.train.source_indices)
    assert first.train.class_counts == other.train.class_counts
    assert np.array_equal(first.test.source_indices, other.test.source_indices)


def test_mnist_lt_still_accepts_seed_as_the_deprecated_name_of_subset_seed() -> None:
    with pytest.warns(FutureWarning, match="'seed' is deprecated; write 'subset_seed'"):
        old = build_dataset("mnist_lt", seed=1)
    assert np.array_equal(old.train.source_indices, build_dataset("mnist_lt", subset_seed=1).train.source_indices)
    with pytest.raises(ConfigError, match="give subset_seed only"):
        build_dataset("mnist_lt", seed=1, subset_seed=1)
    with pytest.raises(ConfigError) as caught:
        build_dataset("mnist_lt", sed=1)
    assert [issue.path for issue in caught.value.issues] == ["params.sed"]


def test_schema_lists_subset_seed_and_the_deprecated_seed_of_mnist_lt() -> None:
    from ibcore.config import experiment_json_schema

    datasets = {choice["title"]: choice for choice in experiment_json_schema()["$defs"]["DatasetSpec"]["anyOf"]}
    mnist = datasets["mnist_lt"]["properties"]["params"]["properties"]
    assert mnist["subset_seed"]["default"] is None and mnist["seed"]["deprecated"] is True
    assert "subset_seed" in datasets["array_file"]["properties"]["params"]["properties"]


def test_mnist_lt_subset_seed_unset_follows_the_experiment_seed() -> None:
    from_context = build_dataset("mnist_lt", BuildContext(seed=1))
    pinned = build_dataset("mnist_lt", BuildContext(seed=0), subset_seed=1)
    default = build_dataset("mnist_lt", BuildContext(seed=0))
    assert np.array_equal(from_context.train.source_indices, pinned.train.source_indices)
    assert not np.array_equal(default.train.source_indices, from_context.train.source_indices)


def test_mnist_lt_step_imbalance() -> None:
    dataset = build_dataset("mnist_lt", imbalance_type="step", imbalance_ratio=10)
    assert dataset.train.class_counts == [400] * 5 + [40] * 5


def test_mnist_lt_augment_spec_pads_without_flip() -> None:
    plain = build_dataset("mnist_lt")
    assert plain.train.augment == AugmentSpec(pad=0, flip=False, mean=(0.1307,), std=(0.3081,))
    augmented = build_dataset("mnist_lt", augment=True)
    assert augmented.train.augment == AugmentSpec(pad=2, flip=False, mean=(0.1307,), std=(0.3081,))
    assert augmented.test.augment == AugmentSpec(pad=0, flip=False, mean=(0.1307,), std=(0.3081,))


def test_mnist_lt_getitem_without_augment_is_the_normalised_tensor() -> None:
    split = build_dataset("mnist_lt").train
    images, labels = split.tensors()
    for index in (0, 7, len(split) - 1):
        image, label = split[index]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        assert torch.equal(image, normalised(images[index], split.augment))
        assert label == int(labels[index])


def test_mnist_lt_ratio_leaving_a_class_empty_is_a_data_error() -> None:
    with pytest.raises(DataError, match="leaves classes 8, 9 with zero training images"):
        build_dataset("mnist_lt", imbalance_ratio=1000)


def test_params_out_of_range_are_rejected_before_any_file_is_read() -> None:
    with pytest.raises(ConfigError) as caught:
        build_dataset("mnist_lt", imbalance_ratio=0.5)
    assert [issue.path for issue in caught.value.issues] == ["params.imbalance_ratio"]
    with pytest.raises(ConfigError) as caught:
        build_dataset("cifar10_lt", root="nowhere", subset_method="random", imbalance_factor=100)
    assert {issue.path for issue in caught.value.issues} == {"params.subset_method", "params.imbalance_factor"}
    with pytest.raises(ConfigError, match="params.root"):
        build_dataset("cifar100_lt")


# --------------------------------------------------------------------------------------------
# cifar10_lt / cifar100_lt


def test_cifar10_lt_counts_splits_and_tensors(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, data = cifar10
    dataset = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10)
    expected = long_tail_counts(20, 10, 10, "exp")
    assert expected == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert dataset.num_classes == 10 and dataset.val is None
    assert dataset.train.class_counts == expected
    assert dataset.test.class_counts == [3] * 10  # the test split stays balanced
    assert dataset.class_names[:2] == ["airplane", "automobile"]
    images, labels = dataset.train.tensors()
    assert images.shape == (sum(expected), 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    # The images are the selected training images, channels first as stored in the pickles.
    assert np.array_equal(images.numpy(), data["images"][dataset.train.source_indices])
    assert np.array_equal(dataset.test.tensors()[0].numpy(), data["test_images"])
    assert dataset.test.targets.tolist() == data["test_labels"].tolist()


def test_cifar_augment_spec_is_the_ldam_drw_recipe(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = cifar10
    dataset = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10)
    assert dataset.train.augment == AugmentSpec(pad=4, flip=True, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert dataset.test.augment == AugmentSpec(pad=0, flip=False, mean=CIFAR_MEAN, std=CIFAR_STD)
    plain = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10, augment=False)
    assert plain.train.augment == AugmentSpec(pad=0, flip=False, mean=CIFAR_MEAN, std=CIFAR_STD)
    images, _ = plain.train.tensors()
    for index in (0, len(plain.train) - 1):
        assert torch.equal(plain.train[index][0], normalised(images[index], plain.train.augment))


def test_cifar_getitem_applies_exactly_the_augment_spec(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Every augmented sample is a 32x32 crop of the 4-padded image, maybe flipped, then normalised."""
    root, _ = cifar10
    split = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10).train
    original = split.tensors()[0][3]
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    candidates = [
        normalised(crop.flip(-1) if flipped else crop, split.augment)
        for top in range(9)
        for left in range(9)
        for crop in [padded[:, top : top + 32, left : left + 32]]
        for flipped in (False, True)
    ]
    torch.manual_seed(0)
    matched = []
    for _ in range(40):
        image, _label = split[3]
        hits = [i for i, candidate in enumerate(candidates) if torch.equal(image, candidate)]
        assert hits, "augmented image is not a crop/flip of the padded original"
        matched.append(hits[0])
    assert len({hit % 2 for hit in matched}) == 2  # both flipped and unflipped samples occur
    assert len({hit // 2 for hit in matched}) > 10  # many crop positions occur


def test_cao_subset_reproduces_ldam_drw_selection(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, data = cifar10
    dataset = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10, subset_method="cao", subset_seed=3)
    # Independent re-computation of kaidic/LDAM-DRW imbalance_cifar.py gen_imbalanced_data (numpy global RNG).
    counts = [int(20 * (0.1 ** (i / 9.0))) for i in range(10)]
    np.random.seed(3)
    selected = []
    for label, keep in enumerate(counts):
        idx = np.where(data["labels"] == label)[0]
        np.random.shuffle(idx)
        selected.append(idx[:keep])
    expected = np.concatenate(selected)
    assert dataset.train.source_indices.tolist() == expected.tolist()
    assert np.array_equal(dataset.train.tensors()[0].numpy(), data["images"][expected])
    assert dataset.train.targets.tolist() == data["labels"][expected].tolist()


def test_seeded_subset_is_a_default_rng_permutation_per_class(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, data = cifar10
    dataset = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10, subset_seed=5)
    rng = np.random.default_rng(5)
    counts = long_tail_counts(20, 10, 10, "exp")
    expected = np.concatenate([rng.permutation(np.where(data["labels"] == c)[0])[:n] for c, n in enumerate(counts)])
    assert dataset.train.source_indices.tolist() == expected.tolist()
    other = build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10, subset_seed=6)
    assert other.train.class_counts == dataset.train.class_counts
    assert other.train.source_indices.tolist() != expected.tolist()


@pytest.mark.parametrize("method", ["seeded", "cao"])
def test_cifar_subset_seed_unset_follows_the_experiment_seed(
    cifar10: tuple[Path, dict[str, np.ndarray]], method: str
) -> None:
    root, _ = cifar10
    common = {"root": str(root), "imbalance_ratio": 10, "subset_method": method}
    from_context = build_dataset("cifar10_lt", BuildContext(seed=1), **common)
    pinned = build_dataset("cifar10_lt", BuildContext(seed=0), **common, subset_seed=1)
    default = build_dataset("cifar10_lt", BuildContext(seed=0), **common)
    assert from_context.train.source_indices.tolist() == pinned.train.source_indices.tolist()
    assert default.train.source_indices.tolist() != from_context.train.source_indices.tolist()
    # a pinned subset_seed ignores the experiment's seed
    pinned_again = build_dataset("cifar10_lt", BuildContext(seed=5), **common, subset_seed=1)
    assert pinned_again.train.source_indices.tolist() == pinned.train.source_indices.tolist()


def test_val_split_comes_from_unselected_images(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, data = cifar10
    common = {"root": str(root), "imbalance_ratio": 10, "max_per_class": 17, "subset_method": "cao"}
    without_val = build_dataset("cifar10_lt", **common)
    dataset = build_dataset("cifar10_lt", **common, val_per_class=3)
    # The training subset is exactly the one drawn without a validation split.
    assert dataset.train.source_indices.tolist() == without_val.train.source_indices.tolist()
    assert dataset.train.class_counts == long_tail_counts(17, 10, 10, "exp")
    assert dataset.val.class_counts == [3] * 10
    assert not set(dataset.val.source_indices.tolist()) & set(dataset.train.source_indices.tolist())
    assert np.array_equal(dataset.val.tensors()[0].numpy(), data["images"][dataset.val.source_indices])
    assert dataset.val.augment.pad == 0 and not dataset.val.augment.flip


def test_val_split_without_room_in_the_head_class_says_what_to_do(
    cifar10: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = cifar10
    with pytest.raises(DataError, match=r"class 0 has 20 training images .*max_per_class"):
        build_dataset("cifar10_lt", root=str(root), imbalance_ratio=10, val_per_class=2)


def test_cifar100_lt_reads_fine_labels_from_the_folder_itself(tmp_path: Path) -> None:
    labels = make_cifar100(tmp_path / "cifar-100-python")
    dataset = build_dataset("cifar100_lt", root=str(tmp_path / "cifar-100-python"), imbalance_ratio=5)
    assert dataset.num_classes == 100 and dataset.class_names is None  # no meta file in the fixture
    assert dataset.train.class_counts == long_tail_counts(5, 100, 5, "exp")
    assert dataset.test.class_counts == [1] * 100
    assert np.array_equal(dataset.train.targets, labels[dataset.train.source_indices])
    # root may also be the folder that contains cifar-100-python
    parent = build_dataset("cifar100_lt", root=str(tmp_path), imbalance_ratio=5)
    assert parent.train.source_indices.tolist() == dataset.train.source_indices.tolist()


def test_cifar_missing_root_names_the_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*does not exist.*cifar-10-batches-py"):
        build_dataset("cifar10_lt", root=str(missing))
    with pytest.raises(DataError, match=rf"not found under {tmp_path}.*cifar-100-python.*download"):
        build_dataset("cifar100_lt", root=str(tmp_path))


def test_cifar_label_out_of_range_names_the_file(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, data = cifar10
    labels = data["labels"][:40].copy()
    labels[5] = 10
    bad_file = root / "cifar-10-batches-py" / "data_batch_1"
    write_cifar_batch(bad_file, data["images"][:40], labels, b"labels")
    with pytest.raises(DataError, match=rf"{bad_file}: image 5 has label 10, outside \[0, 10\)"):
        build_dataset("cifar10_lt", root=str(root))


def test_cifar_damaged_batch_names_the_file(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = cifar10
    bad_file = root / "cifar-10-batches-py" / "data_batch_3"
    bad_file.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match=rf"{bad_file} is not a readable CIFAR python batch"):
        build_dataset("cifar10_lt", root=str(root))
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing"):
        build_dataset("cifar10_lt", root=str(root))


def test_cifar_ratio_leaving_a_class_empty_is_a_data_error(cifar10: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = cifar10
    with pytest.raises(DataError, match="zero training images"):
        build_dataset("cifar10_lt", root=str(root), imbalance_ratio=100)


# --------------------------------------------------------------------------------------------
# image_list / image_folder (real JPEG files)


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def make_image_list(root: Path, counts: list[int], test_per_class: int = 2) -> tuple[Path, Path]:
    lines = {"train": [], "test": []}
    for split, per_class in (("train", counts), ("test", [test_per_class] * len(counts))):
        for label, n in enumerate(per_class):
            for k in range(n):
                relative = f"{split}/c{label}/img {k}.jpg"  # a space in the name: labels are the last field
                write_jpeg(root / relative, seed=label * 100 + k)
                lines[split].append(f"{relative} {label}")
    train_list, test_list = root / "train.txt", root / "test.txt"
    train_list.write_text("\n".join(lines["train"]) + "\n")
    test_list.write_text("# comment lines and blank lines are skipped\n\n" + "\n".join(lines["test"]) + "\n")
    return train_list, test_list


def test_image_list_counts_and_lazy_images(tmp_path: Path) -> None:
    make_image_list(tmp_path, [4, 2, 1])
    (tmp_path / "val.txt").write_text("test/c0/img 0.jpg 0\ntest/c2/img 1.jpg 2\n")
    dataset = build_dataset(
        "image_list",
        root=str(tmp_path),
        train_list="train.txt",
        test_list="test.txt",
        val_list="val.txt",
        image_size=32,
    )
    assert dataset.num_classes == 3  # inferred: max label + 1
    assert dataset.train.class_counts == [4, 2, 1] and dataset.test.class_counts == [2, 2, 2]
    assert dataset.val.class_counts == [1, 0, 1]
    assert dataset.train.targets.dtype == np.int64
    assert not is_tensor_split(dataset.train)
    image, label = dataset.train[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    test_image, _ = dataset.test[0]
    assert test_image.shape == (3, 32, 32)


def test_image_list_eval_transform_is_resize_center_crop_imagenet_normalised(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    make_image_list(tmp_path, [1, 1])
    dataset = build_dataset(
        "image_list", root=str(tmp_path), train_list="train.txt", test_list="test.txt", image_size=32, augment=False
    )
    image, _ = dataset.train[0]
    with Image.open(tmp_path / "train/c0/img 0.jpg") as opened:
        reference = TF.center_crop(TF.resize(opened.convert("RGB"), 37), 32)  # 37 = round(32 * 256 / 224)
    expected = TF.normalize(TF.to_tensor(reference), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(image, expected)


def test_image_list_errors_name_file_and_line(tmp_path: Path) -> None:
    train_list, test_list = make_image_list(tmp_path, [2, 2])
    common = {"root": str(tmp_path), "train_list": str(train_list), "test_list": str(test_list)}
    test_list.write_text("test/c0/img 0.jpg 0\ntest/c1/img 0.jpg 7\n")
    with pytest.raises(DataError, match=rf"{test_list}:2: label 7 is outside \[0, 2\)"):
        build_dataset("image_list", **common, num_classes=2)
    test_list.write_text("test/c0/img 0.jpg 0\ntest/c1/img_without_label.jpg\n")
    with pytest.raises(DataError, match=rf"{test_list}:2: cannot parse"):
        build_dataset("image_list", **common)
    test_list.write_text("test/c0/img 0.jpg zero\n")
    with pytest.raises(DataError, match=rf"{test_list}:1: cannot parse"):
        build_dataset("image_list", **common)


def test_image_list_class_without_training_images_is_an_error(tmp_path: Path) -> None:
    make_image_list(tmp_path, [2, 0, 1])
    with pytest.raises(DataError, match=r"class 1 has zero training images"):
        build_dataset("image_list", root=str(tmp_path), train_list="train.txt", test_list="test.txt")


def test_image_list_missing_files_are_named(tmp_path: Path) -> None:
    make_image_list(tmp_path, [1, 1])
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere'} does not exist"):
        build_dataset("image_list", root=str(tmp_path / "nowhere"), train_list="train.txt", test_list="test.txt")
    with pytest.raises(DataError, match=rf"'absent.txt' not found.*{tmp_path / 'absent.txt'}"):
        build_dataset("image_list", root=str(tmp_path), train_list="absent.txt", test_list="test.txt")


def test_image_list_bad_image_fails_only_when_read_and_names_the_file(tmp_path: Path) -> None:
    make_image_list(tmp_path, [1, 1])
    broken = tmp_path / "train/c0/img 0.jpg"
    broken.write_bytes(b"this is not a JPEG")
    (tmp_path / "train.txt").write_text("train/c0/img 0.jpg 0\ntrain/c1/img 0.jpg 1\ntrain/c1/gone.jpg 1\n")
    dataset = build_dataset("image_list", root=str(tmp_path), train_list="train.txt", test_list="test.txt")
    assert dataset.train.class_counts == [1, 2]  # built from the list alone
    with pytest.raises(DataError, match=rf"{broken} .*cannot be decoded"):
        dataset.train[0]
    with pytest.raises(DataError, match=r"gone.jpg .*does not exist"):
        dataset.train[2]
    assert dataset.train[1][0].shape == (3, 224, 224)


def make_image_folder(root: Path, train: dict[str, int], test: dict[str, int]) -> None:
    for split, per_class in (("train", train), ("test", test)):
        for name, n in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                write_jpeg(root / split / name / f"{k}.jpg", seed=k, size=(20, 20))


def test_image_folder_counts_from_the_listing(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 1, "ant": 3, "bee": 2}, {"ant": 1, "bee": 1, "cat": 1})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    dataset = build_dataset("image_folder", root=str(tmp_path), image_size=16)
    assert dataset.class_names == ["ant", "bee", "cat"]  # sorted, as torchvision's ImageFolder
    assert dataset.train.class_counts == [3, 2, 1] and dataset.test.class_counts == [1, 1, 1]
    assert dataset.val is None
    image, label = dataset.train[0]
    assert image.shape == (3, 16, 16) and label == 0
    (tmp_path / "val" / "bee").mkdir(parents=True)
    write_jpeg(tmp_path / "val" / "bee" / "0.jpg", seed=0)
    with_val = build_dataset("image_folder", root=str(tmp_path), image_size=16)
    assert with_val.val.class_counts == [0, 1, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere'} does not exist.*<root>/<split>/<class name>"):
        build_dataset("image_folder", root=str(tmp_path / "nowhere"))
    make_image_folder(tmp_path, {"ant": 2, "bee": 0}, {"ant": 1})
    with pytest.raises(DataError, match=r"class 1 \('bee'\) has zero training images"):
        build_dataset("image_folder", root=str(tmp_path))
    write_jpeg(tmp_path / "train" / "bee" / "0.jpg", seed=1)
    write_jpeg(tmp_path / "test" / "wasp" / "0.jpg", seed=2)
    with pytest.raises(DataError, match=r"class folder 'wasp' that the train folder lacks"):
        build_dataset("image_folder", root=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Registration


def test_kind_package_registers_every_dataset_without_importing_torch() -> None:
    code = (
        "import sys, ib_plugins_builtin.datasets as d\n"
        "from ibcore.registry import resolve\n"
        "names = ['mnist_lt', 'cifar10_lt', 'cifar100_lt', 'image_list', 'image_folder', 'array_file']\n"
        "infos = [resolve('dataset', n) for n in names]\n"
        "assert all(i.loaded and i.description for i in infos), infos\n"
        "print(sorted({'torch', 'numpy', 'torchvision', 'PIL'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
