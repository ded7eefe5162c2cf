"""Built-in datasets, registered on import.

This module only declares params and factories; it imports neither torch nor numpy, so ``ib list``
and ``ib validate`` stay light. The factories import their implementation submodules when called.

Every dataset returns an object with ``num_classes``, ``train``, ``test``, ``val`` (``None`` unless
configured) and ``class_names``; each split exposes ``targets`` (int64 numpy), ``class_counts`` and
``num_classes`` without decoding an image. ``mnist_lt``, ``cifar*_lt`` and ``array_file`` splits are tensor
splits (``tensors()`` and an ``augment`` spec the engine can replay on the device).

Seed convention: a dataset whose draw depends on a seed declares ``subset_seed: int | None = None``;
when it is ``None`` the factory uses ``context.seed`` (the experiment's seed), so the run's seed fixes
the subset unless the config pins it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, model_validator

from ibcore import BuildContext, DataPath, Params, register_dataset

if TYPE_CHECKING:
    from ib_plugins_builtin.datasets._splits import ImageDataset

ImbalanceType = Literal["exp", "step"]

_RATIO_HELP = "n_max / n_min, the head class over the tail class (1 = balanced)"
_TYPE_HELP = "'exp': n_i = int(n_max * (1/IR)^(i/(C-1))); 'step': half the classes n_max, half int(n_max/IR)"
_SUBSET_METHOD_HELP = (
    "'cao': the exact subset of LDAM-DRW / BagofTricks-LT (np.random.seed + shuffle per class); "
    "'seeded': a per-class permutation from numpy.random.default_rng(subset_seed)"
)
_SUBSET_SEED_HELP = "seed of the subset draw; None: the experiment's seed"

CIFAR_LT_CITATION = (
    "Cao et al., NeurIPS 2019, 'Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss' "
    "(long-tailed CIFAR protocol); Krizhevsky, 2009, 'Learning Multiple Layers of Features from Tiny Images'"
)


def _schema_with_old_seed_name(schema: dict[str, Any]) -> None:
    """List ``seed`` in the JSON schema too, marked deprecated, so editors accept configs written before the rename."""
    schema.setdefault("properties", {})["seed"] = {
        "anyOf": [{"minimum": 0, "type": "integer"}, {"type": "null"}],
        "deprecated": True,
        "description": "deprecated name of subset_seed",
    }


class MnistLTParams(Params):
    """Params of ``mnist_lt``."""

    model_config = ConfigDict(json_schema_extra=_schema_with_old_seed_name)

    imbalance_ratio: float = Field(10.0, ge=1.0, description=_RATIO_HELP)
    imbalance_type: ImbalanceType = Field("exp", description=_TYPE_HELP)
    test_per_class: int = Field(
        100, ge=1, le=499, description="images per class held out (first in the file) as the balanced test split"
    )
    subset_seed: int | None = Field(
        None,
        ge=0,
        validation_alias=AliasChoices("subset_seed", "seed"),
        description="seed of numpy.random.default_rng that draws the train subset; None: the experiment's seed "
        "('seed' is accepted as its deprecated old name)",
    )
    augment: bool = Field(False, description="pad 2 + random 28x28 crop on the train split (never a flip)")

    def num_classes_hint(self) -> int:
        """The ten digits, known without loading data (so ``ib validate`` checks per-class lists)."""
        return 10

    @model_validator(mode="before")
    @classmethod
    def _old_seed_name(cls, data: Any) -> Any:
        """Accept ``seed`` (the name before ``subset_seed``) with a warning; refuse both at once."""
        if isinstance(data, dict) and "seed" in data:
            if "subset_seed" in data:
                raise ValueError("give subset_seed only; seed is its deprecated old name")
            warnings.warn(
                "mnist_lt: the param 'seed' is deprecated; write 'subset_seed' (leave it out to follow the "
                "experiment's seed)",
                FutureWarning,
                stacklevel=2,
            )
        return data


class CifarLTParams(Params):
    """Params of ``cifar10_lt`` and ``cifar100_lt``."""

    root: Annotated[str, DataPath] = Field(
        ...,
        min_length=1,
        description="folder holding cifar-10-batches-py / cifar-100-python, or that folder itself",
    )
    download: bool = Field(False, description="fetch the python version with torchvision if it is missing")
    imbalance_ratio: float = Field(100.0, ge=1.0, description=_RATIO_HELP)
    imbalance_type: ImbalanceType = Field("exp", description=_TYPE_HELP)
    subset_method: Literal["seeded", "cao"] = Field("seeded", description=_SUBSET_METHOD_HELP)
    subset_seed: int | None = Field(
        None, ge=0, lt=2**32, description=f"{_SUBSET_SEED_HELP} (LDAM-DRW uses 0 with subset_method 'cao')"
    )
    augment: bool = Field(True, description="pad 4 + random 32x32 crop + horizontal flip on the train split")
    val_per_class: int = Field(
        0, ge=0, description="balanced validation split from training images left out of the subset (0 = none)"
    )
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="n_max, images the head class keeps (default: all, 5000 / 500); lower it to leave head "
        "images for val_per_class",
    )


class Cifar10LTParams(CifarLTParams):
    """Params of ``cifar10_lt``."""

    def num_classes_hint(self) -> int:
        """CIFAR-10's classes, known without loading data (so ``ib validate`` checks per-class lists)."""
        return 10


class Cifar100LTParams(CifarLTParams):
    """Params of ``cifar100_lt``."""

    def num_classes_hint(self) -> int:
        """CIFAR-100's classes, known without loading data (so ``ib validate`` checks per-class lists)."""
        return 100


_PositiveFloat = Annotated[float, Field(gt=0.0)]


class ArrayFileParams(Params):
    """Params of ``array_file``."""

    path: Annotated[str, DataPath] = Field(
        ...,
        min_length=1,
        description=".npz file with train_images, train_labels, test_images, test_labels (optional val_images + "
        "val_labels, class_names); a relative path is taken from the working directory, like cifar's root",
    )
    layout: Literal["auto", "nhwc", "nchw"] = Field(
        "auto",
        description="axis order of 4-D image arrays; 'auto': channels last when the last axis is 1 or 3, else "
        "channels first (3-D arrays (N, H, W) are single-channel)",
    )
    num_classes: int | None = Field(
        None, ge=2, description="number of classes (default: len(class_names), else max label + 1 over all splits)"
    )
    imbalance_ratio: float | None = Field(
        None,
        ge=1.0,
        description=f"None: train on the training arrays as they are; a number: cut a long-tailed subset from "
        f"them, {_RATIO_HELP}",
    )
    imbalance_type: ImbalanceType = Field("exp", description=_TYPE_HELP)
    subset_method: Literal["seeded", "cao"] = Field("seeded", description=_SUBSET_METHOD_HELP)
    subset_seed: int | None = Field(
        None, ge=0, lt=2**32, description=f"{_SUBSET_SEED_HELP} (used only with imbalance_ratio)"
    )
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="n_max of the cut, images the head class keeps (default: the smallest class count of the "
        "training arrays); only with imbalance_ratio",
    )
    val_per_class: int = Field(
        0,
        ge=0,
        description="balanced validation split from training images left out of the cut (0 = none); only with "
        "imbalance_ratio, and not when the file has val arrays",
    )
    augment: bool = Field(True, description="random crop from the image padded by pad, and flip, on the train split")
    pad: int = Field(4, ge=0, description="zero padding of the random crop (same size as the image) under augment")
    flip: bool = Field(True, description="random horizontal flip under augment")
    mean: list[float] | None = Field(
        None,
        min_length=1,
        description="per-channel mean of the 0..1 images (default: computed in float64 from the training images, "
        "after the cut)",
    )
    std: list[_PositiveFloat] | None = Field(
        None,
        min_length=1,
        description="per-channel std of the 0..1 images (default: computed in float64 from the training images, "
        "after the cut)",
    )

    def num_classes_hint(self) -> int | None:
        """``num_classes`` when the config sets it (otherwise only the file knows)."""
        return self.num_classes

    @model_validator(mode="after")
    def _cut_options_need_a_ratio(self) -> ArrayFileParams:
        problems = []
        given = [name for name in ("max_per_class", "val_per_class") if getattr(self, name)]
        if self.imbalance_ratio is None and given:
            verb = "applies" if len(given) == 1 else "apply"
            problems.append(
                f"{' and '.join(given)} only {verb} to a long-tailed cut: set imbalance_ratio (1 keeps the classes "
                "balanced)"
            )
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            problems.append(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_cut_draws_nothing(cls, data: Any) -> Any:
        # Nothing is drawn without a cut: a pinned seed tells the engine that every seed can share one copy of
        # the arrays (an unset subset_seed means "a subset per seed").
        if isinstance(data, dict) and data.get("imbalance_ratio") is None and data.get("subset_seed") is None:
            return {**data, "subset_seed": 0}
        return data


_DECODE_HELP = (
    "'pil': each image opened with PIL and transformed by torchvision's transforms in a DataLoader worker (the "
    "official code's loop); 'torchvision': JPEGs decoded by torchvision, on a CUDA device in batch (nvjpeg), "
    "else in the workers, and cropped, resized and flipped as uint8 tensors (within a level or two of 'pil')"
)
_DECODE_DEVICE_HELP = (
    "with decode 'torchvision': 'auto' decodes JPEGs on the training device when it is CUDA, else in the "
    "DataLoader workers; 'cpu' always in the workers (e.g. when the GPU is the bottleneck)"
)


Decoder = Literal["pil", "torchvision"]
DecodeDevice = Literal["auto", "cpu"]


def _check_decode_device(decode: Decoder, decode_device: DecodeDevice) -> None:
    if decode == "pil" and decode_device != "auto":
        raise ValueError(
            f"decode_device: {decode_device} applies to decode: torchvision only (PIL always decodes in the "
            "DataLoader workers); set decode: torchvision, or leave decode_device out"
        )


class ImageListParams(Params):
    """Params of ``image_list``."""

    root: Annotated[str, DataPath] = Field(
        ..., min_length=1, description="folder the image paths in the list files are relative to"
    )
    train_list: str = Field(..., min_length=1, description="list file of the train split ('path label' lines)")
    test_list: str = Field(..., min_length=1, description="list file of the test split")
    val_list: str | None = Field(None, min_length=1, description="list file of an optional validation split")
    num_classes: int | None = Field(None, ge=2, description="number of classes (default: max label + 1)")
    image_size: int = Field(224, ge=8, description="side of the square crop fed to the network")
    augment: bool = Field(True, description="RandomResizedCrop + horizontal flip on the train split")
    decode: Decoder = Field("pil", description=_DECODE_HELP)
    decode_device: DecodeDevice = Field("auto", description=_DECODE_DEVICE_HELP)

    def num_classes_hint(self) -> int | None:
        """``num_classes`` when the config sets it (otherwise only the list files know)."""
        return self.num_classes

    @model_validator(mode="after")
    def _decode_device_needs_torchvision(self) -> ImageListParams:
        _check_decode_device(self.decode, self.decode_device)
        return self


class ImageFolderParams(Params):
    """Params of ``image_folder``."""

    root: Annotated[str, DataPath] = Field(
        ..., min_length=1, description="folder holding <train_dir>/<class>/*, <test_dir>/<class>/*"
    )
    train_dir: str = Field("train", min_length=1, description="train sub-folder of root")
    test_dir: str = Field("test", min_length=1, description="test sub-folder of root")
    val_dir: str | None = Field(
        None, min_length=1, description="validation sub-folder (default: root/val when it exists, else none)"
    )
    image_size: int = Field(224, ge=8, description="side of the square crop fed to the network")
    augment: bool = Field(True, description="RandomResizedCrop + horizontal flip on the train split")
    decode: Decoder = Field("pil", description=_DECODE_HELP)
    decode_device: DecodeDevice = Field("auto", description=_DECODE_DEVICE_HELP)

    @model_validator(mode="after")
    def _decode_device_needs_torchvision(self) -> ImageFolderParams:
        _check_decode_device(self.decode, self.decode_device)
        return self


def _subset_seed(seed: int | None, context: BuildContext) -> int:
    """The seed of a dataset's subset draw: ``subset_seed`` when set, else the experiment's seed."""
    return seed if seed is not None else context.seed


@register_dataset(
    "mnist_lt",
    MnistLTParams,
    citation="LeCun et al., Proc. IEEE 1998, 'Gradient-Based Learning Applied to Document Recognition'",
)
def build_mnist_lt(params: MnistLTParams, context: BuildContext) -> ImageDataset:
    """Long-tailed MNIST from the 5,000 digits shipped in the package (offline, 1x28x28).

    Mean/std 0.1307/0.3081; the balanced test split is held out before the train subset is drawn.
    """
    from ib_plugins_builtin.datasets._mnist import build_mnist_lt as build

    return build(
        imbalance_ratio=params.imbalance_ratio,
        imbalance_type=params.imbalance_type,
        test_per_class=params.test_per_class,
        seed=_subset_seed(params.subset_seed, context),
        augment=params.augment,
    )


def _build_cifar(num_classes: int, params: CifarLTParams, context: BuildContext) -> ImageDataset:
    from ib_plugins_builtin.datasets._cifar import CIFAR10, CIFAR100, build_cifar_lt

    return build_cifar_lt(
        CIFAR10 if num_classes == 10 else CIFAR100,
        root=params.root,
        download=params.download,
        imbalance_ratio=params.imbalance_ratio,
        imbalance_type=params.imbalance_type,
        subset_method=params.subset_method,
        subset_seed=_subset_seed(params.subset_seed, context),
        augment=params.augment,
        val_per_class=params.val_per_class,
        max_per_class=params.max_per_class,
    )


@register_dataset("cifar10_lt", Cifar10LTParams, citation=CIFAR_LT_CITATION)
def build_cifar10_lt(params: Cifar10LTParams, context: BuildContext) -> ImageDataset:
    """Long-tailed CIFAR-10 (Cao et al. protocol) from the official python batches; balanced test split.

    Normalisation of LDAM-DRW: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).
    """
    return _build_cifar(10, params, context)


@register_dataset("cifar100_lt", Cifar100LTParams, citation=CIFAR_LT_CITATION)
def build_cifar100_lt(params: Cifar100LTParams, context: BuildContext) -> ImageDataset:
    """Long-tailed CIFAR-100 (Cao et al. protocol) from the official python batches; balanced test split.

    Normalisation of LDAM-DRW: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).
    """
    return _build_cifar(100, params, context)


@register_dataset("array_file", ArrayFileParams)
def build_array_file(params: ArrayFileParams, context: BuildContext) -> ImageDataset:
    """Images and labels from a .npz file (train/test, optional val and class_names), optionally cut long-tailed.

    Offline and pickle-free: a prepared CIFAR-LT, or any uint8 image arrays, held as tensor splits.
    """
    from ib_plugins_builtin.datasets._array_file import build_array_file as build

    return build(
        path=params.path,
        layout=params.layout,
        num_classes=params.num_classes,
        imbalance_ratio=params.imbalance_ratio,
        imbalance_type=params.imbalance_type,
        subset_method=params.subset_method,
        subset_seed=_subset_seed(params.subset_seed, context),
        max_per_class=params.max_per_class,
        val_per_class=params.val_per_class,
        augment=params.augment,
        pad=params.pad,
        flip=params.flip,
        mean=params.mean,
        std=params.std,
    )


@register_dataset(
    "image_list",
    ImageListParams,
    citation="Liu et al., CVPR 2019, 'Large-Scale Long-Tailed Recognition in an Open World' (ImageNet-LT lists)",
)
def build_image_list(params: ImageListParams, context: BuildContext) -> ImageDataset:
    """Images named by list files ('relative/path label' per line): ImageNet-LT, iNaturalist, Places-LT.

    ImageNet recipe: RandomResizedCrop + flip (train), Resize(size*256/224) + CenterCrop (eval), ImageNet mean/std.
    """
    from ib_plugins_builtin.datasets._image_files import build_image_list as build

    return build(
        root=params.root,
        train_list=params.train_list,
        test_list=params.test_list,
        val_list=params.val_list,
        num_classes=params.num_classes,
        image_size=params.image_size,
        augment=params.augment,
        decode=params.decode,
        decode_device=params.decode_device,
    )


@register_dataset("image_folder", ImageFolderParams)
def build_image_folder(params: ImageFolderParams, context: BuildContext) -> ImageDataset:
    """Images in a torchvision ImageFolder tree: root/train/<class>/*, root/test/<class>/*, optional val.

    Class indices follow the sorted train sub-folder names; the same ImageNet recipe as image_list.
    """
    from ib_plugins_builtin.datasets._image_files import build_image_folder as build

    return build(
        root=params.root,
        train_dir=params.train_dir,
        test_dir=params.test_dir,
        val_dir=params.val_dir,
        image_size=params.image_size,
        augment=params.augment,
        decode=params.decode,
        decode_device=params.decode_device,
    )


__all__ = [
    "ArrayFileParams",
    "Cifar100LTParams",
    "Cifar10LTParams",
    "CifarLTParams",
    "ImageFolderParams",
    "ImageListParams",
    "MnistLTParams",
    "build_array_file",
    "build_cifar100_lt",
    "build_cifar10_lt",
    "build_image_folder",
    "build_image_list",
    "build_mnist_lt",
]
