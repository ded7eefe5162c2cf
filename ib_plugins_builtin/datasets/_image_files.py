"""``image_list`` and ``image_folder``: large long-tailed sets (ImageNet-LT, iNaturalist, Places-LT) on disk.

Only file names and labels are read when the dataset is built; images are decoded (with PIL, through
torchvision's transforms) one at a time in ``__getitem__``. Augmentation is the standard ImageNet
recipe: RandomResizedCrop + horizontal flip for training, Resize(size * 256/224) + CenterCrop for
evaluation, both normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ib_plugins_builtin.datasets._splits import ImageDataset, ImageFileSplit, count_classes
from ibcore import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LIST_LAYOUT = "one '<path relative to root> <integer label>' per line"


def imagenet_transforms(image_size: int, augment: bool) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(train, eval) torchvision transforms; without ``augment`` the train split gets the eval transform."""
    from torchvision import transforms

    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    evaluation = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),  # 256 for the usual 224 crop
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalise,
        ]
    )
    if not augment:
        return evaluation, evaluation
    training = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    return training, evaluation


def _require_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {path} {'is not a folder' if path.exists() else 'does not exist'}; {layout}.")


def _check_has_every_class(counts: list[int], where: str, names: list[str] | None = None) -> None:
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        label = f"class {empty[0]}" + (f" ({names[empty[0]]!r})" if names else "")
        raise DataError(
            f"{where}: {label} has zero training images ({len(empty)} empty class(es) in all); every class "
            "needs at least one training image (or set num_classes to the classes you have)."
        )


# --------------------------------------------------------------------------------------------
# image_list


@dataclasses.dataclass
class ListFile:
    """One parsed list file: relative paths, labels and the line each came from."""

    path: Path
    relative_paths: list[str]
    labels: np.ndarray
    line_numbers: list[int]


def resolve_list_path(list_path: str, root: Path) -> Path:
    """An absolute path as given; a relative one under ``root`` first, then the working directory."""
    given = Path(list_path).expanduser()
    candidates = [given] if given.is_absolute() else [root / given, given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise DataError(f"List file {list_path!r} not found (looked for {tried}); expected a text file with {LIST_LAYOUT}.")


def read_list_file(path: Path) -> ListFile:
    """Parse ``relative/path.jpg label`` lines; blank lines and ``#`` comments are skipped."""
    relative_paths: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                parts = text.rsplit(maxsplit=1)  # paths may contain spaces; the label is the last field
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                except ValueError:
                    raise DataError(f"{path}:{line_number}: cannot parse {text!r}; expected {LIST_LAYOUT}.") from None
                relative_paths.append(parts[0])
                labels.append(label)
                line_numbers.append(line_number)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a UTF-8 text list file ({exc}); expected {LIST_LAYOUT}.") from exc
    if not relative_paths:
        raise DataError(f"{path} lists no images; expected {LIST_LAYOUT}.")
    return ListFile(path, relative_paths, np.asarray(labels, dtype=np.int64), line_numbers)


def _check_labels(parsed: ListFile, num_classes: int) -> None:
    bad = np.flatnonzero((parsed.labels < 0) | (parsed.labels >= num_classes))
    if len(bad):
        first = int(bad[0])
        raise DataError(
            f"{parsed.path}:{parsed.line_numbers[first]}: label {parsed.labels[first]} is outside "
            f"[0, {num_classes}) ({len(bad)} such line(s) in this file)."
        )


def build_image_list(
    *,
    root: str,
    train_list: str,
    test_list: str,
    val_list: str | None,
    num_classes: int | None,
    image_size: int,
    augment: bool,
) -> ImageDataset:
    """Splits from list files of ``relative/path label`` lines; ``num_classes`` defaults to max label + 1."""
    root_path = Path(root).expanduser()
    _require_dir(root_path, "image_list root", "expected the folder the list files' paths are relative to")
    names = {"train": train_list, "test": test_list, "val": val_list}
    parsed = {
        split: read_list_file(resolve_list_path(list_path, root_path))
        for split, list_path in names.items()
        if list_path is not None
    }
    if num_classes is None:
        num_classes = int(max(p.labels.max() for p in parsed.values())) + 1
    for lists in parsed.values():
        _check_labels(lists, num_classes)
    train_counts = count_classes(parsed["train"].labels, num_classes)
    _check_has_every_class(train_counts, f"train list {parsed['train'].path}")
    train_transform, eval_transform = imagenet_transforms(image_size, augment)

    def split(lists: ListFile, transform: Callable[[Any], Any]) -> ImageFileSplit:
        paths = [str(root_path / relative) for relative in lists.relative_paths]
        return ImageFileSplit(paths, lists.labels, num_classes, transform)

    return ImageDataset(
        num_classes=num_classes,
        train=split(parsed["train"], train_transform),
        test=split(parsed["test"], eval_transform),
        val=split(parsed["val"], eval_transform) if "val" in parsed else None,
        class_names=None,
    )


# --------------------------------------------------------------------------------------------
# image_folder

FOLDER_LAYOUT = "expected <root>/<split>/<class name>/<image> (torchvision ImageFolder layout)"


def list_class_folders(folder: Path) -> list[str]:
    """Class names: the sub-folders, sorted as torchvision's ImageFolder sorts them (hidden ones skipped)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def list_images(folder: Path, class_names: list[str], split_name: str) -> tuple[list[str], np.ndarray]:
    """Image paths (sorted, found recursively) and labels from file names only: no image is opened."""
    known = set(class_names)
    unknown = [name for name in list_class_folders(folder) if name not in known]
    if unknown:
        raise DataError(
            f"{split_name} folder {folder} has class folder {unknown[0]!r} that the train folder lacks; "
            "every class must have training images."
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # an evaluation split may lack a class; the train split is checked separately
        for directory, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs.sort()
            for file_name in sorted(files):
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(directory, file_name))
                    labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


def build_image_folder(
    *, root: str, train_dir: str, test_dir: str, val_dir: str | None, image_size: int, augment: bool
) -> ImageDataset:
    """Splits from ``root/train/<class>/*``, ``root/test/<class>/*`` and optionally ``root/val/<class>/*``."""
    root_path = Path(root).expanduser()
    _require_dir(root_path, "image_folder root", FOLDER_LAYOUT)
    train_path, test_path = root_path / train_dir, root_path / test_dir
    _require_dir(train_path, "image_folder train folder", FOLDER_LAYOUT)
    _require_dir(test_path, "image_folder test folder", FOLDER_LAYOUT)
    if val_dir is not None:
        val_path: Path | None = root_path / val_dir
        _require_dir(val_path, "image_folder val folder", FOLDER_LAYOUT)
    else:
        val_path = root_path / "val" if (root_path / "val").is_dir() else None
    class_names = list_class_folders(train_path)
    if not class_names:
        raise DataError(f"image_folder train folder {train_path} has no class folders; {FOLDER_LAYOUT}.")
    num_classes = len(class_names)
    train_paths, train_labels = list_images(train_path, class_names, "train")
    _check_has_every_class(count_classes(train_labels, num_classes), f"train folder {train_path}", class_names)
    train_transform, eval_transform = imagenet_transforms(image_size, augment)
    test_paths, test_labels = list_images(test_path, class_names, "test")
    if not test_paths:
        raise DataError(f"image_folder test folder {test_path} holds no images; {FOLDER_LAYOUT}.")
    val_split = None
    if val_path is not None:
        val_paths, val_labels = list_images(val_path, class_names, "val")
        val_split = ImageFileSplit(val_paths, val_labels, num_classes, eval_transform)
    return ImageDataset(
        num_classes=num_classes,
        train=ImageFileSplit(train_paths, train_labels, num_classes, train_transform),
        test=ImageFileSplit(test_paths, test_labels, num_classes, eval_transform),
        val=val_split,
        class_names=class_names,
    )
