"""``ib resume`` must train on the data the run started with (issue 14, round 2).

``fingerprint`` summarises a built data set without decoding an image (class counts, split sizes, a
hash of the labels in order, a hash of a sample of the bytes of splits held as tensors);
``check_same_data`` says what differs. The trainer stores the fingerprint in meta.json at ``ib run``
and checks it on ``ib resume``; here both work on small in-memory data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ibcore import AugmentSpec
from ibcore.context import BuildContext
from ibcore.engine.batches import DeviceData, LoaderData
from ibcore.engine.experiment_data import SeedData, check_same_data, fingerprint
from ibcore.errors import DataError

SPEC = AugmentSpec(mean=(0.5,), std=(0.25,), pad=0, flip=False)


class TensorSplit:
    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.targets, self.augment = images, np.asarray(labels, dtype=np.int64), SPEC
        self.class_counts = np.bincount(self.targets, minlength=3).tolist()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, torch.as_tensor(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


class FileSplit:
    """Like image_list: only labels are known until an image is read (reading one fails the test)."""

    def __init__(self, labels: list[int]) -> None:
        self.targets = np.asarray(labels, dtype=np.int64)
        self.class_counts = np.bincount(self.targets, minlength=3).tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("the fingerprint decoded an image")


def seed_data(train: Any, test: Any, val: Any = None, *, device: bool = True) -> SeedData:
    def wrap(split: Any) -> DeviceData | LoaderData:
        return DeviceData(split, torch.device("cpu")) if device else LoaderData(split, torch.device("cpu"), 0)

    counts = tuple(int(n) for n in np.bincount(train.targets, minlength=3))
    return SeedData(
        context=BuildContext(num_classes=3, class_counts=counts, targets=train.targets),
        train=wrap(train),
        test=wrap(test),
        val=None if val is None else wrap(val),
    )


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


TRAIN = [0, 0, 0, 0, 1, 1, 2]
TEST = [0, 1, 2]


def tensor_data(train: list[int] = TRAIN, seed: int = 0, test: list[int] = TEST) -> SeedData:
    return seed_data(TensorSplit(images(len(train), seed), train), TensorSplit(images(len(test), 9), test))


def file_data(train: list[int] = TRAIN, test: list[int] = TEST, val: list[int] | None = None) -> SeedData:
    return seed_data(FileSplit(train), FileSplit(test), None if val is None else FileSplit(val), device=False)


def test_the_fingerprint_is_small_json_and_stable(tmp_path: Path) -> None:
    first = fingerprint(tensor_data())
    assert json.loads(json.dumps(first)) == first == fingerprint(tensor_data())
    assert first["class_counts"] == [4, 2, 1] and first["train"]["images"] == 7 and first["val"] is None
    assert "sampled_images_sha256" in first["train"]
    assert "sampled_images_sha256" not in fingerprint(file_data())["train"]  # images on disk are never read
    check_same_data(first, fingerprint(tensor_data()), tmp_path)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (lambda: tensor_data(train=[0, 0, 0, 1, 1, 2]), "training images per class: [4, 2, 1] when the run started"),
        (lambda: tensor_data(train=[0, 0, 0, 1, 0, 1, 2]), "train split: the same number of images, but other labels"),
        (lambda: tensor_data(seed=5), "train split: the same labels, but other image bytes"),
        (lambda: tensor_data(test=[0, 1, 2, 2]), "test split: 3 images when the run started, 4 now"),
    ],
    ids=["class counts", "label order", "pixels", "test size"],
)
def test_other_data_is_a_data_error_that_says_what_differs(tmp_path: Path, now: Any, expected: str) -> None:
    with pytest.raises(DataError) as error:
        check_same_data(fingerprint(tensor_data()), fingerprint(now()), tmp_path / "run")
    message = str(error.value)
    assert expected in message, message
    assert str(tmp_path / "run") in message and "config.yaml" in message and "ib run" in message


def test_file_splits_are_compared_by_their_labels_and_a_new_validation_split_is_noticed(tmp_path: Path) -> None:
    saved = fingerprint(file_data())
    check_same_data(saved, fingerprint(file_data()), tmp_path)
    with pytest.raises(DataError, match="val split: absent when the run started, present now"):
        check_same_data(saved, fingerprint(file_data(val=[0, 1])), tmp_path)
    with pytest.raises(DataError, match="test split: the same number of images, but other labels or another order"):
        check_same_data(saved, fingerprint(file_data(test=[2, 1, 0])), tmp_path)


@pytest.mark.parametrize("saved", [None, {}, {"version": 99, "train": {}}, "garbage"], ids=str)
def test_a_run_without_a_comparable_fingerprint_resumes(tmp_path: Path, saved: Any) -> None:
    check_same_data(saved, fingerprint(tensor_data(seed=3)), tmp_path)  # an older run directory: nothing to compare


def test_the_fingerprint_of_a_large_tensor_split_samples_its_images(tmp_path: Path) -> None:
    labels = [i % 3 for i in range(20_000)]
    big = torch.zeros(20_000, 1, 4, 4, dtype=torch.uint8)
    data = seed_data(TensorSplit(big, labels), TensorSplit(images(3), TEST))
    changed = big.clone()
    changed[-1, 0, 0, 0] = 1  # the last image is always sampled
    other = seed_data(TensorSplit(changed, labels), TensorSplit(images(3), TEST))
    with pytest.raises(DataError, match="other image bytes"):
        check_same_data(fingerprint(data), fingerprint(other), tmp_path)
