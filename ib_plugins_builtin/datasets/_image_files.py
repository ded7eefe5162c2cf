"""``image_list`` and ``image_folder``: large long-tailed sets (ImageNet-LT, iNaturalist, Places-LT) on disk.

Only file names and labels are read when the dataset is built; images are decoded when read: with PIL,
through torchvision's transforms, one at a time in ``__getitem__`` (``decode: pil``), or by torchvision's
decoders in DataLoader workers or in batch on the device (``decode: torchvision``, see ``_jpeg``).
Augmentation is the standard ImageNet recipe (``_image_recipe``): RandomResizedCrop + horizontal flip for
training, Resize(size * 256/224) + CenterCrop for evaluation, both normalised with the ImageNet mean and std.

Paths and links. ``image_list``: a path in a list file is relative to ``root`` and must stay inside it
(no ``..`` leading out of it; an absolute path only under ``root``, so ``root: /`` takes a list of
absolute paths; checked on the text, so a symbolic link inside ``root`` may point anywhere); naming one
image on several lines is allowed (it is then used that many times).
``image_folder``: the split and class folders may be symbolic links; inside a class folder, links to
files are followed (each link is one image) and links to folders are followed too, but every real
folder is read at most once per class folder and never one the class folder is in, so a link to the
folder itself (``ln -s . loop``), to a folder above it (``ln -s .. up``: the split folder, root) or a
second link to one folder adds nothing. Hidden entries (names starting with
``.``: ``.ipynb_checkpoints``, macOS ``._x.jpg`` files) are skipped, as hidden class folders are. An
image name that is not a readable file (a dangling link, a FIFO) or a folder that cannot be listed is a
``DataError`` when the data set is built: the class counts are always what is on disk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ib_plugins_builtin.datasets._image_recipe import ImageRecipe
from ib_plugins_builtin.datasets._splits import DecodeDevice, Decoder, ImageDataset, ImageFileSplit, count_classes
from ibcore import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LIST_LAYOUT = "one '<path relative to root> <integer label>' per line"


def imagenet_recipes(image_size: int, augment: bool) -> tuple[ImageRecipe, ImageRecipe]:
    """(train, eval) recipes; without ``augment`` the train split gets the evaluation recipe."""
    evaluation = ImageRecipe(image_size, random_crop=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return (dataclasses.replace(evaluation, random_crop=True) if augment else evaluation), evaluation


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


def _check_inside_root(parsed: ListFile, root: Path) -> None:
    """Every path of a list file leads to a file under ``root`` (a text check: no file is opened).

    Relative paths are the rule; an absolute one is accepted when it lies under ``root`` (``root: /``
    for a list of absolute paths). ``..`` may be used as long as the path stays inside ``root``.
    """
    top = os.path.normpath(os.path.abspath(root))
    prefix = top if top.endswith(os.sep) else top + os.sep
    for relative, line_number in zip(parsed.relative_paths, parsed.line_numbers, strict=True):
        target = os.path.normpath(os.path.join(top, relative.replace("\\", "/")))
        if target != top and not target.startswith(prefix):
            raise DataError(
                f"{parsed.path}:{line_number}: image path {relative!r} leads outside root {root}; paths in a list "
                "file are relative to the image_list root and stay inside it (set root to a folder that holds every "
                "image, e.g. their common parent, and write the paths relative to it; for a list of absolute "
                "paths, set root to '/')."
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
    decode: Decoder = "pil",
    decode_device: DecodeDevice = "auto",
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
        _check_inside_root(lists, root_path)
        _check_labels(lists, num_classes)
    train_counts = count_classes(parsed["train"].labels, num_classes)
    _check_has_every_class(train_counts, f"train list {parsed['train'].path}")
    train_recipe, eval_recipe = imagenet_recipes(image_size, augment)

    def split(lists: ListFile, recipe: ImageRecipe) -> ImageFileSplit:
        paths = [str(root_path / relative) for relative in lists.relative_paths]
        return ImageFileSplit(paths, lists.labels, num_classes, recipe, decode, decode_device)

    return ImageDataset(
        num_classes=num_classes,
        train=split(parsed["train"], train_recipe),
        test=split(parsed["test"], eval_recipe),
        val=split(parsed["val"], eval_recipe) if "val" in parsed else None,
        class_names=None,
    )


# --------------------------------------------------------------------------------------------
# image_folder

FOLDER_LAYOUT = "expected <root>/<split>/<class name>/<image> (torchvision ImageFolder layout)"


def _scan(folder: str | Path) -> list[os.DirEntry[str]]:
    """The entries of ``folder`` sorted by name; a folder that cannot be listed is a DataError."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list the image folder {folder}: {exc.strerror or exc}") from exc


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symbolic link
    except OSError:
        return False


def list_class_folders(folder: Path) -> list[str]:
    """Class names: the sub-folders, sorted as torchvision's ImageFolder sorts them (hidden ones skipped)."""
    return [entry.name for entry in _scan(folder) if not entry.name.startswith(".") and _is_dir(entry)]


def _folder_key(directory: str | Path) -> tuple[int, int] | str | None:
    """A folder's identity (device, inode), its resolved path where the file system has no inode numbers."""
    try:
        status = os.stat(directory)
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if status.st_ino else os.path.realpath(directory)


def _image_files(class_dir: Path) -> list[str]:
    """Image files under ``class_dir``, in ``os.walk``'s sorted top-down order, each real folder read once.

    Links are followed, but a folder reached again (through ``ln -s . loop``, a link to a folder above
    the class folder, a second link to one folder) is skipped: a loop can neither multiply the images nor
    hang the walk.
    Hidden entries are skipped. An image name that is no readable file is a DataError.
    """
    paths: list[str] = []
    # the folders above the class folder count as read: a link to one of them (`ln -s .. up`) adds nothing
    above = {*Path(os.path.realpath(class_dir)).parents, *Path(os.path.abspath(class_dir)).parents}
    seen = {key for key in map(_folder_key, above) if key is not None}
    pending = [str(class_dir)]
    while pending:
        directory = pending.pop()
        key = _folder_key(directory)
        if key is None:
            raise DataError(f"cannot read the image folder {directory}: it vanished or cannot be opened")
        if key in seen:
            continue  # reached again through a link
        seen.add(key)
        subfolders = []
        for entry in _scan(directory):
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    regular = entry.is_file()  # follows a link: False for a dangling one, a FIFO, a socket
                except OSError:
                    regular = False
                if not regular:
                    what = (
                        "a symbolic link to nothing"
                        if entry.is_symlink() and not os.path.exists(entry.path)
                        else "not a regular file"
                    )
                    raise DataError(
                        f"image_folder: {entry.path} is {what}; remove it or replace it with the image file."
                    )
                paths.append(entry.path)
        pending.extend(reversed(subfolders))  # depth-first, in sorted order, like os.walk
    return paths


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
        found = _image_files(class_dir)
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64)


def build_image_folder(
    *,
    root: str,
    train_dir: str,
    test_dir: str,
    val_dir: str | None,
    image_size: int,
    augment: bool,
    decode: Decoder = "pil",
    decode_device: DecodeDevice = "auto",
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
    train_recipe, eval_recipe = imagenet_recipes(image_size, augment)

    def split(paths: list[str], labels: np.ndarray, recipe: ImageRecipe) -> ImageFileSplit:
        return ImageFileSplit(paths, labels, num_classes, recipe, decode, decode_device)

    test_paths, test_labels = list_images(test_path, class_names, "test")
    if not test_paths:
        raise DataError(f"image_folder test folder {test_path} holds no images; {FOLDER_LAYOUT}.")
    val_split = None
    if val_path is not None:
        val_paths, val_labels = list_images(val_path, class_names, "val")
        val_split = split(val_paths, val_labels, eval_recipe)
    return ImageDataset(
        num_classes=num_classes,
        train=split(train_paths, train_labels, train_recipe),
        test=split(test_paths, test_labels, eval_recipe),
        val=val_split,
        class_names=class_names,
    )
