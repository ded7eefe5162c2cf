"""Augmentation policies for a uint8 batch on the device: every sample draws its own ops and magnitudes.

A policy splits its randomness from its arithmetic:

* ``draw(n, generator)`` makes all random choices for ``n`` samples from ``generator`` only (no global RNG)
  and returns them as CPU tensors whose first dimension is the sample, so a data-parallel rank can keep its
  slice of a global batch's draws with ``{k: v[rank::world] for k, v in draws.items()}``;
* ``apply(images, draws)`` is deterministic: uint8 (N, C, H, W) on any device → uint8, same shape. It groups
  the samples by drawn op (on the CPU: no device synchronisation) and runs each group as one batched op
  from :mod:`._ops`, each equal to torchvision's functional op on every image.

The draws are the ones torchvision's transforms make for one image (same distributions, same comparisons:
an op of a sub-policy applies when ``U <= p`` for a float32 uniform ``U``, a signed magnitude is negated
when ``U <= 0.5``), made per sample instead of per call. A generator on the device is accepted; its draws
are copied to the CPU, which waits for the device, so a CPU generator is the one to use in a training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ib_plugins_builtin.augmentations._ops import (
    Fill,
    _check_images,
    _fill_values,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_grouped,
    to_device,
)

Draws = dict[str, Tensor]


@runtime_checkable
class Policy(Protocol):
    """What the engine calls: per-sample draws, then their deterministic application."""

    def draw(self, n: int, generator: torch.Generator) -> Draws: ...

    def apply(self, images: Tensor, draws: Draws) -> Tensor: ...


# ------------------------------------------------------------------------------------------------
# Random draws (from the given generator only, returned on the CPU)


def _rand(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).cpu()


def _randint(generator: torch.Generator, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=generator, device=generator.device).cpu()


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _check_fill(fill: Fill) -> Fill:
    if fill is None:
        return None
    if isinstance(fill, (int, float)):
        return float(fill)
    if isinstance(fill, Sequence) and fill and all(isinstance(v, (int, float)) for v in fill):
        return [float(v) for v in fill]
    raise ValueError(f"fill must be a number or a sequence of numbers (one per channel), got {fill!r}")


# ------------------------------------------------------------------------------------------------
# Magnitude spaces: torchvision.transforms.v2's _AUGMENTATION_SPACE formulas (float32 linspace, as there)

MagnitudeFn = Callable[[int, int, int], Tensor | None]


def _linspace(end: float) -> MagnitudeFn:
    return lambda num_bins, height, width: torch.linspace(0.0, end, num_bins)


def _none(num_bins: int, height: int, width: int) -> None:
    return None


def _posterize(levels: int) -> MagnitudeFn:
    return lambda num_bins, height, width: (8 - (torch.arange(num_bins) / ((num_bins - 1) / levels))).round().int()


def _solarize(num_bins: int, height: int, width: int) -> Tensor:
    return torch.linspace(1.0, 0.0, num_bins)


def _translate_x(num_bins: int, height: int, width: int) -> Tensor:
    return torch.linspace(0.0, 150.0 / 331.0 * width, num_bins)


def _translate_y(num_bins: int, height: int, width: int) -> Tensor:
    return torch.linspace(0.0, 150.0 / 331.0 * height, num_bins)


_AUTOAUGMENT_SPACE: dict[str, tuple[MagnitudeFn, bool]] = {
    "ShearX": (_linspace(0.3), True),
    "ShearY": (_linspace(0.3), True),
    "TranslateX": (_translate_x, True),
    "TranslateY": (_translate_y, True),
    "Rotate": (_linspace(30.0), True),
    "Brightness": (_linspace(0.9), True),
    "Color": (_linspace(0.9), True),
    "Contrast": (_linspace(0.9), True),
    "Sharpness": (_linspace(0.9), True),
    "Posterize": (_posterize(4), False),
    "Solarize": (_solarize, False),
    "AutoContrast": (_none, False),
    "Equalize": (_none, False),
    "Invert": (_none, False),
}

_RANDAUGMENT_SPACE: dict[str, tuple[MagnitudeFn, bool]] = {
    "Identity": (_none, False),
    **{name: value for name, value in _AUTOAUGMENT_SPACE.items() if name != "Invert"},
}

_TRIVIALAUGMENT_SPACE: dict[str, tuple[MagnitudeFn, bool]] = {
    "Identity": (_none, False),
    "ShearX": (_linspace(0.99), True),
    "ShearY": (_linspace(0.99), True),
    "TranslateX": (_linspace(32.0), True),
    "TranslateY": (_linspace(32.0), True),
    "Rotate": (_linspace(135.0), True),
    "Brightness": (_linspace(0.99), True),
    "Color": (_linspace(0.99), True),
    "Contrast": (_linspace(0.99), True),
    "Sharpness": (_linspace(0.99), True),
    "Posterize": (_posterize(6), False),
    "Solarize": (_solarize, False),
    "AutoContrast": (_none, False),
    "Equalize": (_none, False),
}

# torchvision.transforms.v2.AutoAugment._get_policies: ((op, probability, magnitude bin or None), ...) × 25
_SUB_POLICIES: dict[str, list[tuple[tuple[str, float, int | None], tuple[str, float, int | None]]]] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ],
}


class _OpChainPolicy:
    """AutoAugment-style policies: per sample a fixed number of slots, each one op with a magnitude bin.

    Draws: ``op`` (N, K) int64, an index into :attr:`op_names`; ``bin`` (N, K) int64, the magnitude bin
    (-1 for an op without magnitude); ``negate`` (N, K) bool, the drawn sign of a signed op; and for
    AutoAugment ``apply`` (N, K) bool (an op not applied is the identity) and ``sub_policy`` (N,) int64.
    """

    _space: dict[str, tuple[MagnitudeFn, bool]]
    _table_bins: int

    def __init__(self, fill: Fill) -> None:
        self.fill = _check_fill(fill)
        self.op_names: tuple[str, ...] = tuple(self._space)
        self._signed = torch.tensor([signed for _, signed in self._space.values()])
        self._tables: dict[tuple[int, int], Tensor] = {}

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``apply(images, draw(len(images), generator))``."""
        return self.apply(images, self.draw(images.shape[0], generator))

    def _signs(self, ops: Tensor, generator: torch.Generator) -> Tensor:
        return (_rand(generator, *ops.shape) <= 0.5) & self._signed[ops]

    def magnitude_table(self, height: int, width: int) -> Tensor:
        """(ops, bins) float64: the magnitude of each op at each bin for images of this size (0 where an op
        has none), the values torchvision reads from its float32 ``_AUGMENTATION_SPACE`` tensors."""
        key = (height, width)
        if key not in self._tables:
            table = torch.zeros(len(self._space), self._table_bins, dtype=torch.float64)
            for row, (fn, _) in enumerate(self._space.values()):
                values = fn(self._table_bins, height, width)
                if values is not None:
                    table[row] = values.to(torch.float64)
            self._tables[key] = table
        return self._tables[key]

    def magnitudes(self, draws: Draws, height: int, width: int) -> Tensor:
        """(N, K) float64: the signed magnitude each sample's op gets (the value torchvision passes to its op)."""
        ops, bins = draws["op"], draws["bin"]
        values = self.magnitude_table(height, width)[ops, bins.clamp(min=0)]
        values = torch.where(bins < 0, torch.zeros_like(values), values)
        return torch.where(draws["negate"] & self._signed[ops], -values, values)

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        _check_images(images)
        n, _, h, w = images.shape
        ops = draws["op"].cpu()
        if ops.shape[0] != n:
            raise ValueError(f"draws are for {ops.shape[0]} samples; the batch has {n}")
        names = (*self.op_names, "Identity")
        if "apply" in draws:
            ops = torch.where(draws["apply"].cpu(), ops, len(self.op_names))
        magnitudes = self.magnitudes({k: v.cpu() for k, v in draws.items()}, h, w)
        output = images
        for k in range(ops.shape[1]):
            output = apply_grouped(output, names, ops[:, k], magnitudes[:, k], self.fill)
        return output if output is not images else images.clone()


class AutoAugment(_OpChainPolicy):
    """torchvision's AutoAugment per sample: a sub-policy uniformly among 25, then each of its two ops with its
    probability, at its magnitude bin (of 10), with a random sign for a signed op; nearest interpolation."""

    _space = _AUTOAUGMENT_SPACE
    _table_bins = 10

    def __init__(self, policy: str = "imagenet", fill: Fill = 0) -> None:
        super().__init__(fill)
        name = str(getattr(policy, "value", policy)).lower()
        if name not in _SUB_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(_SUB_POLICIES)}, got {policy!r}")
        self.policy = name
        table = _SUB_POLICIES[name]
        index = {op: i for i, op in enumerate(self.op_names)}
        self.sub_policies = list(table)
        self._sub_ops = torch.tensor([[index[op] for op, _, _ in sub] for sub in table])
        self._sub_bins = torch.tensor([[-1 if b is None else b for _, _, b in sub] for sub in table])
        self._sub_probs = torch.tensor([[p for _, p, _ in sub] for sub in table], dtype=torch.float32)

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        _check_n(n)
        sub = _randint(generator, len(self.sub_policies), n)
        applies = _rand(generator, n, 2) <= self._sub_probs[sub]
        ops = self._sub_ops[sub]
        return {
            "sub_policy": sub,
            "op": ops,
            "bin": self._sub_bins[sub],
            "apply": applies,
            "negate": self._signs(ops, generator),
        }

    def __repr__(self) -> str:
        return f"AutoAugment(policy={self.policy!r}, fill={self.fill!r})"


class RandAugment(_OpChainPolicy):
    """torchvision's RandAugment per sample: ``num_ops`` ops, each uniformly among its 14 (Identity included),
    at bin ``magnitude`` of ``num_magnitude_bins``, with a random sign for a signed op."""

    _space = _RANDAUGMENT_SPACE

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31, fill: Fill = 0) -> None:
        if not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}")
        if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be an int >= 2, got {num_magnitude_bins!r}")
        if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be an int in [0, {num_magnitude_bins - 1}], got {magnitude!r}")
        self._table_bins = num_magnitude_bins
        super().__init__(fill)
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        _check_n(n)
        ops = _randint(generator, len(self.op_names), n, self.num_ops)
        bins = torch.full_like(ops, self.magnitude)
        return {"op": ops, "bin": bins, "negate": self._signs(ops, generator)}

    def __repr__(self) -> str:
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"num_magnitude_bins={self.num_magnitude_bins}, fill={self.fill!r})"
        )


class TrivialAugmentWide(_OpChainPolicy):
    """torchvision's TrivialAugmentWide per sample: one op uniformly among its 14, one magnitude bin uniformly
    among ``num_magnitude_bins``, a random sign for a signed op."""

    _space = _TRIVIALAUGMENT_SPACE

    def __init__(self, num_magnitude_bins: int = 31, fill: Fill = 0) -> None:
        if not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be an int >= 2, got {num_magnitude_bins!r}")
        self._table_bins = num_magnitude_bins
        super().__init__(fill)
        self.num_magnitude_bins = num_magnitude_bins

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        _check_n(n)
        ops = _randint(generator, len(self.op_names), n, 1)
        bins = _randint(generator, self.num_magnitude_bins, n, 1)
        return {"op": ops, "bin": bins, "negate": self._signs(ops, generator)}

    def __repr__(self) -> str:
        return f"TrivialAugmentWide(num_magnitude_bins={self.num_magnitude_bins}, fill={self.fill!r})"


# ------------------------------------------------------------------------------------------------
# ColorJitter

Range = float | Sequence[float] | None


def _jitter_range(
    value: Range, name: str, center: float = 1.0, bound: tuple[float, float] = (0.0, float("inf")), clip: bool = True
) -> tuple[float, float] | None:
    """torchvision.transforms.v2.ColorJitter._check_input."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"If {name} is a single number, it must be non negative.")
        low, high = center - value, center + value
        if clip:
            low = max(low, 0.0)
    elif isinstance(value, Sequence) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
    else:
        raise ValueError(f"{name}={value!r} should be a single number or a sequence with length 2.")
    if not bound[0] <= low <= high <= bound[1]:
        raise ValueError(f"{name} values should be between {bound} and increasing, but got {[low, high]}.")
    return None if low == high == center else (float(low), float(high))


class ColorJitter:
    """torchvision's ColorJitter per sample: its own order of brightness, contrast, saturation and hue (a
    uniform permutation, as ``torch.randperm(4)``) and its own factors, uniform in the ranges (float32, as
    ``torch.empty(1).uniform_(low, high)``).

    Draws: ``order`` (N, 4) int64 (0 brightness, 1 contrast, 2 saturation, 3 hue, in the order applied) and
    ``brightness`` / ``contrast`` / ``saturation`` / ``hue`` (N,) float64 for the adjustments configured.
    """

    _NAMES = ("brightness", "contrast", "saturation", "hue")
    _KERNELS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

    def __init__(self, brightness: Range = None, contrast: Range = None, saturation: Range = None, hue: Range = None):
        self.brightness = _jitter_range(brightness, "brightness")
        self.contrast = _jitter_range(contrast, "contrast")
        self.saturation = _jitter_range(saturation, "saturation")
        self.hue = _jitter_range(hue, "hue", center=0.0, bound=(-0.5, 0.5), clip=False)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))

    def _ranges(self) -> tuple[tuple[float, float] | None, ...]:
        return (self.brightness, self.contrast, self.saturation, self.hue)

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        _check_n(n)
        draws = {"order": torch.argsort(_rand(generator, n, 4, dtype=torch.float64), dim=1)}
        for name, bounds in zip(self._NAMES, self._ranges(), strict=True):
            if bounds is not None:
                values = torch.empty(n, device=generator.device, dtype=torch.float32)
                draws[name] = values.uniform_(bounds[0], bounds[1], generator=generator).cpu().to(torch.float64)
        return draws

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        _check_images(images)
        order = draws["order"].cpu()
        if order.shape[0] != images.shape[0]:
            raise ValueError(f"draws are for {order.shape[0]} samples; the batch has {images.shape[0]}")
        output = images.clone()
        for k in range(order.shape[1]):
            column = order[:, k]
            for fn in torch.unique(column).tolist():
                if self._ranges()[fn] is None:
                    continue
                factors = draws[self._NAMES[fn]].cpu()
                kernel = self._KERNELS[fn]
                if bool((column == fn).all()):
                    output = kernel(output, factors)
                    continue
                rows = torch.nonzero(column == fn).reshape(-1)
                index = to_device(rows, images.device)
                output.index_copy_(0, index, kernel(output.index_select(0, index), factors[rows]))
        return output

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue})"
        )


# ------------------------------------------------------------------------------------------------
# Cutout (DeVries & Taylor 2017, github.com/uoguelph-mlrg/Cutout util/cutout.py)


class Cutout:
    """``n_holes`` squares of side ``length`` cut out of each image, each centred on a pixel drawn uniformly in
    the image and clipped at the border, as the original ``Cutout`` (github.com/uoguelph-mlrg/Cutout,
    util/cutout.py): ``y1, y2 = clip(y - length // 2, 0, h), clip(y + length // 2, 0, h)``, likewise for x,
    so an odd ``length`` cuts ``length - 1`` pixels and holes may overlap.

    Where it goes (``normalised``, read by the engine):

    * ``True`` (the default): the original's placement, after ``Normalize`` (its train.py appends Cutout after
      ``normalize``): ``apply`` takes the normalised float batch and multiplies it by the mask, so a hole is 0,
      the data set's mean colour (``fill`` replaces 0, in normalised units);
    * ``False``: PaCo's CIFAR placement (``paco_cifar.py``: ``ToTensor(), Cutout(n_holes=1, length=16),
      Normalize(...)``): ``apply`` takes uint8 pixels and a hole is ``fill`` (0, black, as there).

    ``apply`` follows the dtype it is given: uint8 images get ``fill`` as a pixel value (0..255), float images
    ``fill`` as it is (0: the original's ``img * mask``).

    Draws: ``centre`` (N, n_holes, 2) float64 in [0, 1): where the centre lies as a fraction of the height and
    of the width (the image size is known only to ``apply``): row ``floor(u * h)``, uniform over the rows.
    """

    def __init__(
        self, length: int = 16, n_holes: int = 1, fill: Fill = 0, normalised: bool = True, *, size: int | None = None
    ) -> None:
        if size is not None:
            length = size
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not isinstance(n_holes, int) or n_holes < 0:
            raise ValueError(f"n_holes must be a non-negative int, got {n_holes!r}")
        self.length = length
        self.n_holes = n_holes
        self.fill = _check_fill(fill)
        self.normalised = bool(normalised)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        _check_n(n)
        return {"centre": _rand(generator, n, self.n_holes, 2, dtype=torch.float64)}

    def boxes(self, draws: Draws, height: int, width: int) -> Tensor:
        """(N, n_holes, 4) int64 on the CPU: ``y1, y2, x1, x2`` of each hole (rows ``y1:y2``, columns ``x1:x2``)."""
        centre = draws["centre"].cpu()
        y = (centre[..., 0] * height).floor().to(torch.int64).clamp_(0, max(height - 1, 0))
        x = (centre[..., 1] * width).floor().to(torch.int64).clamp_(0, max(width - 1, 0))
        half = self.length // 2
        corners = ((y - half, height), (y + half, height), (x - half, width), (x + half, width))
        return torch.stack([value.clamp(0, size) for value, size in corners], dim=-1)

    def mask(self, draws: Draws, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
        """(N, 1, H, W) bool on ``device``: True where the image is kept (the original's mask, as booleans)."""
        device = torch.device(device)
        boxes = to_device(self.boxes(draws, height, width), device)
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        in_rows = (rows >= boxes[..., 0:1]) & (rows < boxes[..., 1:2])  # (N, holes, H)
        in_cols = (cols >= boxes[..., 2:3]) & (cols < boxes[..., 3:4])  # (N, holes, W)
        cut = (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)
        return ~cut[:, None]

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        if images.ndim != 4:
            raise TypeError(f"expected a batch (N, C, H, W), got shape {tuple(images.shape)}")
        n, c, h, w = images.shape
        if draws["centre"].shape[0] != n:
            raise ValueError(f"draws are for {draws['centre'].shape[0]} samples; the batch has {n}")
        keep = self.mask(draws, h, w, images.device)
        values = _fill_values(self.fill, c)
        if images.dtype == torch.uint8:
            values = values or [0.0]
            if any(not 0.0 <= v <= 255.0 for v in values):
                raise ValueError(f"fill must lie in [0, 255] on uint8 images, got {self.fill!r}")
            fill = to_device(torch.tensor(values).round().to(torch.uint8), images.device).view(1, -1, 1, 1)
            return torch.where(keep, images, fill)
        if not images.is_floating_point():
            raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")
        if values is None:
            return images * keep.to(images.dtype)  # the original's img * mask
        fill = to_device(torch.tensor(values, dtype=images.dtype), images.device).view(1, -1, 1, 1)
        return torch.where(keep, images, fill)

    def __repr__(self) -> str:
        return f"Cutout(length={self.length}, n_holes={self.n_holes}, fill={self.fill!r}, normalised={self.normalised})"
