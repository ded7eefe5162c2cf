"""``array_file``: a dataset read from a .npz file of image and label arrays (fixtures written here)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ibcore
from ib_plugins_builtin.datasets._longtail import long_tail_counts, select_long_tail
from ibcore import AugmentSpec, BuildContext, ConfigError, DataError
from ibcore.protocols import is_tensor_split

TRAIN_PER_CLASS = (12, 10, 9, 8)  # the smallest class (8) is n_max of a cut
NAMES = ["ant", "bee", "cat", "dog"]


def make_arrays(seed: int = 0, channels: int = 3, size: int = 8) -> dict[str, np.ndarray]:
    """A tiny data set as the file format holds it: NHWC uint8 images, shuffled labels, class names."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(4), TRAIN_PER_CLASS)).astype(np.uint8)
    test_labels = np.tile(np.arange(4), 3).astype(np.int64)
    return {
        "train_images": rng.integers(0, 256, (len(train_labels), size, size, channels), dtype=np.uint8),
        "train_labels": train_labels,
        "test_images": rng.integers(0, 256, (len(test_labels), size, size, channels), dtype=np.uint8),
        "test_labels": test_labels,
        "class_names": np.array(NAMES),
        "train_files": np.array([f"train/{i}.png" for i in range(len(train_labels))]),  # extra: ignored
    }


def write(path: Path, arrays: dict[str, Any]) -> Path:
    np.savez(path, **arrays)
    return path


def build(path: Path | str, context: BuildContext | None = None, **params: Any) -> Any:
    return ibcore.build("dataset", "array_file", {"path": str(path), **params}, context=context or BuildContext())


def nchw(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2)


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return make_arrays()


@pytest.fixture
def npz(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    return write(tmp_path / "data.npz", arrays)


# --------------------------------------------------------------------------------------------
# Loading


def test_nhwc_nchw_and_grayscale_load_to_the_same_tensors(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    channels_last = build(write(tmp_path / "nhwc.npz", arrays))
    first = {**arrays, "train_images": nchw(arrays["train_images"]), "test_images": nchw(arrays["test_images"])}
    channels_first = build(write(tmp_path / "nchw.npz", first))
    for split in ("train", "test"):
        images, labels = getattr(channels_last, split).tensors()
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
        assert torch.equal(images, torch.from_numpy(nchw(arrays[f"{split}_images"])))
        other_images, other_labels = getattr(channels_first, split).tensors()
        assert torch.equal(other_images, images) and torch.equal(other_labels, labels)

    gray = make_arrays(channels=1)
    variants = {
        "hw": {**gray, "train_images": gray["train_images"][..., 0], "test_images": gray["test_images"][..., 0]},
        "hwc": gray,
        "chw": {**gray, "train_images": nchw(gray["train_images"]), "test_images": nchw(gray["test_images"])},
    }
    loaded = {name: build(write(tmp_path / f"{name}.npz", content)) for name, content in variants.items()}
    expected = torch.from_numpy(nchw(gray["train_images"]))
    for dataset in loaded.values():
        assert torch.equal(dataset.train.tensors()[0], expected)
        assert len(dataset.train.augment.mean) == 1


def test_layout_overrides_the_guess_for_an_ambiguous_shape(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    # (N, 3, 8, 3): channels first with a width of 3, which auto would read as channels last.
    odd = {
        **arrays,
        "train_images": arrays["train_images"][:, :, :3].transpose(0, 3, 1, 2),
        "test_images": arrays["test_images"][:, :, :3].transpose(0, 3, 1, 2),
    }
    path = write(tmp_path / "odd.npz", odd)
    assert build(path, layout="nchw").train.tensors()[0].shape[1:] == (3, 8, 3)
    assert build(path).train.tensors()[0].shape[1:] == (3, 3, 8)
    assert build(path, layout="nhwc").train.tensors()[0].shape[1:] == (3, 3, 8)


def test_counts_targets_and_class_names_come_from_the_arrays(npz: Path, arrays: dict[str, np.ndarray]) -> None:
    dataset = build(npz)
    assert dataset.num_classes == 4 and dataset.class_names == NAMES and dataset.val is None
    assert dataset.train.class_counts == list(TRAIN_PER_CLASS) and dataset.test.class_counts == [3] * 4
    assert dataset.train.targets.dtype == np.int64
    assert dataset.train.targets.tolist() == arrays["train_labels"].tolist()  # the file's order, uncut
    assert dataset.test.targets.tolist() == arrays["test_labels"].tolist()
    assert dataset.train.tensors()[1].tolist() == arrays["train_labels"].tolist()
    assert is_tensor_split(dataset.train) and is_tensor_split(dataset.test)
    image, label = dataset.test[5]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == arrays["test_labels"][5]


def test_num_classes_defaults_to_max_label_plus_one_or_is_given(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    unnamed = {key: value for key, value in arrays.items() if key != "class_names"}
    path = write(tmp_path / "unnamed.npz", unnamed)
    dataset = build(path)
    assert dataset.num_classes == 4 and dataset.class_names is None
    # More classes than the labels show is allowed only when each has training images.
    with pytest.raises(DataError, match=r"'train_labels' has no training image of class 4"):
        build(path, num_classes=5)


def test_a_relative_path_is_taken_from_the_working_directory(npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(npz.parent)
    assert build("data.npz").train.class_counts == list(TRAIN_PER_CLASS)


# --------------------------------------------------------------------------------------------
# Long-tailed cut and validation


@pytest.mark.parametrize("method", ["seeded", "cao"])
def test_long_tail_cut_is_the_subset_of_select_long_tail(npz: Path, arrays: dict[str, np.ndarray], method: str) -> None:
    dataset = build(npz, imbalance_ratio=4, subset_method=method, subset_seed=7)
    counts = long_tail_counts(8, 4, 4, "exp")  # n_max: the smallest class of the file
    assert dataset.train.class_counts == counts == [8, 5, 3, 2]
    labels = arrays["train_labels"].astype(np.int64)
    expected, _ = select_long_tail(labels, counts, method=method, seed=7, where="test")
    assert dataset.train.source_indices.tolist() == expected.tolist()
    assert torch.equal(dataset.train.tensors()[0], torch.from_numpy(nchw(arrays["train_images"][expected])))
    assert dataset.train.targets.tolist() == labels[expected].tolist()
    assert dataset.test.class_counts == [3] * 4  # the test split is never cut


def test_cut_with_max_per_class_and_step(npz: Path) -> None:
    assert build(npz, imbalance_ratio=3, max_per_class=6).train.class_counts == long_tail_counts(6, 4, 3, "exp")
    assert build(npz, imbalance_ratio=4, imbalance_type="step").train.class_counts == [8, 8, 2, 2]
    with pytest.raises(DataError, match=r"data\.npz.*class 3 has 8 training images but needs 9"):
        build(npz, imbalance_ratio=1, max_per_class=9)
    with pytest.raises(DataError, match="zero training images"):
        build(npz, imbalance_ratio=100)


def test_subset_seed_unset_follows_the_experiment_seed(npz: Path) -> None:
    from_context = build(npz, BuildContext(seed=1), imbalance_ratio=4)
    pinned = build(npz, BuildContext(seed=0), imbalance_ratio=4, subset_seed=1)
    other = build(npz, BuildContext(seed=0), imbalance_ratio=4)
    assert from_context.train.source_indices.tolist() == pinned.train.source_indices.tolist()
    assert other.train.source_indices.tolist() != from_context.train.source_indices.tolist()


def test_val_per_class_comes_from_images_the_cut_leaves_out(npz: Path, arrays: dict[str, np.ndarray]) -> None:
    without = build(npz, imbalance_ratio=4, max_per_class=6)
    dataset = build(npz, imbalance_ratio=4, max_per_class=6, val_per_class=2)
    assert dataset.train.source_indices.tolist() == without.train.source_indices.tolist()
    assert dataset.val.class_counts == [2] * 4
    assert not set(dataset.val.source_indices.tolist()) & set(dataset.train.source_indices.tolist())
    expected = nchw(arrays["train_images"][dataset.val.source_indices])
    assert torch.equal(dataset.val.tensors()[0], torch.from_numpy(expected))
    assert dataset.val.augment.pad == 0 and not dataset.val.augment.flip
    with pytest.raises(
        DataError, match=r"class 2 has 9 training images but needs 8 .* plus 2 for validation.*max_per_class: 6"
    ):
        build(npz, imbalance_ratio=1, val_per_class=2)


def test_val_arrays_of_the_file_are_the_validation_split(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    val_labels = np.array([0, 1, 2, 3, 3])
    val_images = np.random.default_rng(3).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = write(tmp_path / "val.npz", {**arrays, "val_images": val_images, "val_labels": val_labels})
    dataset = build(path)
    assert dataset.val.class_counts == [1, 1, 1, 2] and dataset.val.targets.tolist() == val_labels.tolist()
    assert torch.equal(dataset.val.tensors()[0], torch.from_numpy(nchw(val_images)))
    assert dataset.val.augment == dataset.test.augment
    assert build(path, imbalance_ratio=4).val.class_counts == [1, 1, 1, 2]
    with pytest.raises(DataError, match=r"val\.npz already has 'val_images' and 'val_labels'"):
        build(path, imbalance_ratio=4, max_per_class=6, val_per_class=1)


def test_cut_options_without_imbalance_ratio_are_config_errors(npz: Path) -> None:
    for extra in ({"val_per_class": 2}, {"max_per_class": 5}):
        with pytest.raises(ConfigError, match="imbalance_ratio"):
            build(npz, **extra)
    with pytest.raises(ConfigError) as caught:
        build(npz, subset_sed=1, layout="hwc")
    assert {issue.path for issue in caught.value.issues} == {"params.subset_sed", "params.layout"}


# --------------------------------------------------------------------------------------------
# Augmentation and normalisation


def test_mean_and_std_default_to_those_of_the_training_images(npz: Path, arrays: dict[str, np.ndarray]) -> None:
    dataset = build(npz)
    scaled = nchw(arrays["train_images"]).astype(np.float64) / 255.0
    np.testing.assert_allclose(dataset.train.augment.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(dataset.train.augment.std, scaled.std(axis=(0, 2, 3)), rtol=1e-12)
    assert dataset.test.augment.mean == dataset.train.augment.mean
    assert dataset.test.augment.std == dataset.train.augment.std
    # After a cut, the statistics are those of the images kept.
    cut = build(npz, imbalance_ratio=4)
    kept = nchw(arrays["train_images"][cut.train.source_indices]).astype(np.float64) / 255.0
    np.testing.assert_allclose(cut.train.augment.mean, kept.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(cut.train.augment.std, kept.std(axis=(0, 2, 3)), rtol=1e-12)


def test_given_mean_and_std_are_used_and_applied(npz: Path) -> None:
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    dataset = build(npz, mean=mean, std=std, augment=False)
    assert dataset.train.augment == AugmentSpec(pad=0, flip=False, mean=tuple(mean), std=tuple(std))
    image, _ = dataset.train[3]
    raw = dataset.train.tensors()[0][3].float() / 255.0
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(image, expected)


def test_augmentation_defaults_and_options(npz: Path) -> None:
    spec = build(npz).train.augment
    assert (spec.pad, spec.flip) == (4, True)
    spec = build(npz, pad=2, flip=False).train.augment
    assert (spec.pad, spec.flip) == (2, False)
    test_spec = build(npz).test.augment
    assert (test_spec.pad, test_spec.flip) == (0, False)


def test_mean_or_std_of_the_wrong_length_is_an_error(npz: Path) -> None:
    with pytest.raises(DataError, match=r"data\.npz: mean has 1 value\(s\) but .*'train_images' have 3 channel"):
        build(npz, mean=[0.5])
    with pytest.raises(DataError, match=r"std has 2 value\(s\)"):
        build(npz, std=[0.2, 0.2])
    with pytest.raises(ConfigError, match="mean has 3 values but std has 2"):
        build(npz, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(ConfigError, match="params.std"):
        build(npz, std=[0.2, 0.0, 0.2])


def test_a_constant_channel_needs_an_explicit_std(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    flat = arrays["train_images"].copy()
    flat[..., 1] = 7
    path = write(tmp_path / "flat.npz", {**arrays, "train_images": flat})
    with pytest.raises(DataError, match=r"channel 1 .* constant"):
        build(path)
    assert build(path, std=[0.25, 0.25, 0.25]).train.augment.std == (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------
# Errors: every one a DataError naming the file and the array


def without(arrays: dict[str, np.ndarray], *names: str) -> dict[str, np.ndarray]:
    return {key: value for key, value in arrays.items() if key not in names}


def _bad_arrays() -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    a = make_arrays()
    out_of_range = a["test_labels"].copy()
    out_of_range[5] = 9
    negative = a["train_labels"].astype(np.int64)
    negative[2] = -1
    return [
        (
            "missing array",
            without(a, "test_labels"),
            {},
            r"lacks the required array\(s\) test_labels; it holds: "
            r"class_names, test_images, train_files, train_images, train_labels",
        ),
        (
            "float images",
            {**a, "train_images": a["train_images"].astype(np.float32)},
            {},
            r"array 'train_images' must be uint8 .* got float32",
        ),
        (
            "2-D images",
            {**a, "test_images": a["test_images"][:, :, :, 0].reshape(12, -1)},
            {},
            r"array 'test_images' has shape \(12, 64\) \(2-D\)",
        ),
        ("5-D images", {**a, "train_images": a["train_images"][:, None]}, {}, r"array 'train_images' has shape .*5-D"),
        (
            "fewer labels",
            {**a, "train_labels": a["train_labels"][:-1]},
            {},
            r"array 'train_labels' has 38 labels for the 39 images of 'train_images'",
        ),
        (
            "label out of range",
            {**a, "test_labels": out_of_range},
            {},
            r"array 'test_labels' gives image 5 of the test split the class index 9, outside 0\.\.3",
        ),
        (
            "negative label",
            {**a, "train_labels": negative},
            {},
            r"array 'train_labels' gives image 2 of the train split the negative class index -1",
        ),
        (
            "float labels",
            {**a, "test_labels": a["test_labels"].astype(np.float64)},
            {},
            r"array 'test_labels' must hold integer class indices .* got float64",
        ),
        ("2-D labels", {**a, "test_labels": a["test_labels"][:, None]}, {}, r"array 'test_labels' must be 1-D"),
        (
            "class without training images",
            {**a, "train_labels": np.where(a["train_labels"] == 2, 1, a["train_labels"])},
            {},
            r"array 'train_labels' has no training image of class 2 \('cat'\)",
        ),
        (
            "image shapes differ",
            {**a, "test_images": a["test_images"][:, :4]},
            {},
            r"array 'test_images' holds images of shape \(C, H, W\) = \(3, 4, 8\) but 'train_images' holds \(3, 8, 8\)",
        ),
        (
            "channels differ",
            {**a, "test_images": a["test_images"][..., :1]},
            {},
            r"array 'test_images' holds images of shape .*\(1, 8, 8\)",
        ),
        (
            "class names vs num_classes",
            a,
            {"num_classes": 5},
            r"array 'class_names' holds 4 names but num_classes is 5",
        ),
        (
            "class names not strings",
            {**a, "class_names": np.arange(4)},
            {},
            r"array 'class_names' must be a 1-D array of strings",
        ),
        (
            "pickled class names",
            {**a, "class_names": np.array(NAMES, dtype=object)},
            {},
            r"array 'class_names' holds Python objects",
        ),
        ("val images only", {**a, "val_images": a["test_images"]}, {}, r"has 'val_images' but no 'val_labels'"),
        ("val labels only", {**a, "val_labels": a["test_labels"]}, {}, r"has 'val_labels' but no 'val_images'"),
        (
            "empty test split",
            {**a, "test_images": a["test_images"][:0], "test_labels": a["test_labels"][:0]},
            {},
            r"array 'test_images' holds no images",
        ),
    ]


@pytest.mark.parametrize(
    ("content", "params", "message"), [case[1:] for case in _bad_arrays()], ids=[case[0] for case in _bad_arrays()]
)
def test_bad_arrays_are_data_errors_naming_file_and_array(
    tmp_path: Path, content: dict[str, Any], params: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "bad.npz", content)
    with pytest.raises(DataError, match=message) as caught:
        build(path, **params)
    assert str(path) in str(caught.value)


def test_missing_or_unreadable_files_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(DataError, match=r"nowhere\.npz does not exist"):
        build(missing)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive\n")
    with pytest.raises(DataError, match=r"notes\.npz is not (a readable|an) \.npz archive"):
        build(text)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(write(tmp_path / "whole.npz", make_arrays()).read_bytes()[:300])
    with pytest.raises(DataError, match=r"truncated\.npz"):
        build(truncated)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **make_arrays())
    damaged = bytearray(compressed.read_bytes())
    middle = len(damaged) // 3  # inside the compressed train_images
    damaged[middle] ^= 0xFF
    damaged[middle + 1] ^= 0xFF
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged\.npz: array '\w+' cannot be read"):
        build(tmp_path / "damaged.npz")
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"train_images": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"pickled\.npz is not an \.npz archive .* never loaded"):
        build(pickled)
    single = tmp_path / "single.npy"
    np.save(single, make_arrays()["train_images"])
    with pytest.raises(DataError, match=r"single\.npy holds a single array"):
        build(single)
    with pytest.raises(DataError, match=r"is not a file"):
        build(tmp_path)


# --------------------------------------------------------------------------------------------
# End to end


def test_one_epoch_on_an_array_file_writes_results(npz: Path, tmp_path: Path) -> None:
    config = {
        "seed": 0,
        "data": {"dataset": {"name": "array_file", "params": {"path": str(npz), "pad": 1}}, "batch_size": 16},
        "trainer": {"epochs": 1, "eval_every": 1, "device": "cpu"},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"in_channels": 3, "width": 4}},
            "optimizer": {"name": "sgd", "params": {"lr": 0.05}},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [{"name": "ce"}],
        "evaluators": [{"name": "accuracy"}],
    }
    results = ibcore.run(config, out_dir=tmp_path / "out", quiet=True)
    for name in ("metrics.jsonl", "results.json", "results.csv"):
        assert (results.run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (results.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["run"], line["epoch"]) for line in lines if line["split"] == "test"] == [("ce", 1)]
    assert 0 <= results.row("ce")["acc1"] <= 100
    meta = json.loads((results.run_dir / "meta.json").read_text())
    assert meta["class_counts"] == list(TRAIN_PER_CLASS)
