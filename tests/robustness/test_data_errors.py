"""Missing, truncated and corrupt data through `ib validate` and `ib run`: exit 1 and a message naming the file.

tests/test_datasets.py checks the dataset builders' errors one by one; here they go end to end through
the CLI, as a user meets them (no traceback, the path in the message).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import base_config, no_traceback

Cli = Callable[..., Any]


def write_config(tmp_path: Path, dataset: dict[str, Any], **changes: Any) -> Path:
    config = base_config()
    config["data"]["dataset"] = dataset
    config["data"].update(batch_size=8, **changes.pop("data", {}))
    config["trainer"].update(epochs=1, eval_every=1)
    config["runs"] = [{"name": "ce"}]
    config["defaults"]["backbone"] = changes.pop("backbone", config["defaults"]["backbone"])
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def run(ib_cli: Cli, path: Path, tmp_path: Path) -> tuple[int, str]:
    result = ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out"))
    assert no_traceback(result.output), result.output
    return result.rc, " ".join(result.err.split())


# --------------------------------------------------------------------------------------------
# A dataset root that does not exist


@pytest.mark.parametrize(
    "dataset",
    [
        {"name": "cifar10_lt", "params": {"root": "{missing}"}},
        {"name": "cifar100_lt", "params": {"root": "{missing}"}},
        {"name": "image_folder", "params": {"root": "{missing}"}},
        {"name": "image_list", "params": {"root": "{missing}", "train_list": "train.txt", "test_list": "test.txt"}},
    ],
    ids=lambda d: d["name"],
)
def test_a_dataset_root_that_does_not_exist(ib_cli: Cli, tmp_path: Path, dataset: dict[str, Any]) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    dataset = json.loads(json.dumps(dataset).replace("{missing}", str(missing)))
    path = write_config(tmp_path, dataset)
    # Documented: `ib validate` checks the config, not the data (it may be validated on another machine).
    assert ib_cli("validate", str(path)).rc == 0
    rc, message = run(ib_cli, path, tmp_path)
    assert rc == 1 and str(missing) in message and "does not exist" in message


# --------------------------------------------------------------------------------------------
# CIFAR python batches: truncated, missing, malformed


def write_cifar10(root: Path, per_class_per_batch: int = 2) -> Path:
    """A tiny CIFAR-10 in the official python layout (five train batches, a test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class_per_batch)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    return folder


def cifar_config(tmp_path: Path, root: Path) -> Path:
    dataset = {"name": "cifar10_lt", "params": {"root": str(root), "imbalance_ratio": 2.0}}
    return write_config(tmp_path, dataset, backbone={"name": "small_cnn", "params": {"in_channels": 3, "width": 4}})


def test_the_tiny_cifar_trains(ib_cli: Cli, tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar")
    rc, message = run(ib_cli, cifar_config(tmp_path, tmp_path / "cifar"), tmp_path)
    assert rc == 0, message


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate", "is not a readable CIFAR python batch"),
        ("delete", "is missing"),
        ("empty", "is not a readable CIFAR python batch"),
        ("not a dict", "holds a list, not a CIFAR batch dict"),
        ("wrong shape", "b'data' must be uint8 of shape (N, 3072)"),
        ("label out of range", "has label 10, outside [0, 10)"),
    ],
)
def test_a_damaged_cifar_batch_is_named(ib_cli: Cli, tmp_path: Path, damage: str, expected: str) -> None:
    folder = write_cifar10(tmp_path / "cifar")
    batch = folder / "data_batch_3"
    if damage == "truncate":
        batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    elif damage == "delete":
        batch.unlink()
    elif damage == "empty":
        batch.write_bytes(b"")
    elif damage == "not a dict":
        batch.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "wrong shape":
        batch.write_bytes(pickle.dumps({b"data": np.zeros((20, 100), np.uint8), b"labels": [0] * 20}))
    else:
        batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    rc, message = run(ib_cli, cifar_config(tmp_path, tmp_path / "cifar"), tmp_path)
    assert rc == 1 and str(batch) in message and expected in message, message


# --------------------------------------------------------------------------------------------
# Image lists: missing and corrupt images, missing list files


def write_image_list(root: Path, extra_train: str = "", extra_test: str = "") -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for label, count in enumerate((6, 4, 2)):
        for i in range(count):
            name = f"images/{label}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
            lines.append(f"{name} {label}")
    (root / "train.txt").write_text("\n".join(lines + [extra_train]).strip() + "\n", encoding="utf-8")
    (root / "test.txt").write_text("\n".join(lines[::2] + [extra_test]).strip() + "\n", encoding="utf-8")


def image_list_config(tmp_path: Path, root: Path, workers: int = 0, **params: Any) -> Path:
    dataset = {
        "name": "image_list",
        "params": {"root": str(root), "train_list": "train.txt", "test_list": "test.txt", "image_size": 8, **params},
    }
    return write_config(
        tmp_path,
        dataset,
        data={"num_workers": workers},
        backbone={"name": "small_cnn", "params": {"in_channels": 3, "width": 4}},
    )


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_missing_image_is_named(ib_cli: Cli, tmp_path: Path, split: str) -> None:
    root = tmp_path / "data"
    write_image_list(root, **{f"extra_{split}": "images/gone.png 1"})
    rc, message = run(ib_cli, image_list_config(tmp_path, root), tmp_path)
    # Documented: image files are opened when first read, so a missing test image stops the run at the
    # first evaluation (after an epoch of training), a missing training image in the first epoch.
    assert rc == 1 and f"Image file {root / 'images' / 'gone.png'}" in message and "does not exist" in message


def test_a_corrupt_image_is_named(ib_cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image_list(root, extra_train="images/corrupt.png 0")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    rc, message = run(ib_cli, image_list_config(tmp_path, root), tmp_path)
    assert rc == 1 and str(root / "images" / "corrupt.png") in message and "cannot be decoded" in message


def test_a_missing_list_file_is_named(ib_cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image_list(root)
    rc, message = run(ib_cli, image_list_config(tmp_path, root, test_list="nope.txt"), tmp_path)
    assert rc == 1 and "List file 'nope.txt' not found" in message and str(root) in message
    assert not list((tmp_path / "out").glob("*/metrics.jsonl"))  # found before any training


def test_a_missing_image_read_by_a_worker_is_named_without_a_traceback(ib_cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image_list(root, extra_train="images/gone.png 1")
    result = ib_cli("run", str(image_list_config(tmp_path, root, workers=1)), "--quiet", "--out", str(tmp_path / "o"))
    assert result.rc == 1 and "gone.png" in result.err
    assert no_traceback(result.output), result.output
