"""Per-sample image ops on a uint8 batch (N, C, H, W), on its device, equal to torchvision's functional ops.

Every op takes per-sample parameters (one value per image, as a CPU tensor or a sequence) and returns what
``torchvision.transforms.v2.functional`` returns for each image with its own value, pixel for pixel:

* colour ops broadcast a (N, 1, 1, 1) factor through torchvision's own arithmetic. Where torchvision blends
  with ``Tensor.add_(other, alpha=1 - f)`` (one fused multiply-add in ATen's CPU and CUDA kernels) the sum is
  formed in float64 from the exact float32 product and rounded once to float32, which is that fused result;
* geometric ops build torchvision's inverse affine matrix (``_get_inverse_affine_matrix``, in Python floats)
  and sampling grid (``_affine_grid``, the same float32 ops on the same device) for each distinct parameter,
  keep the grids in a small cache, and warp all images of the call with ONE ``grid_sample`` (nearest, zero
  padding, torchvision's mask for a non-zero fill). ``rotate`` keeps torchvision's exact fast paths
  (0°, 180°, and 90°/270° on square images, done with ``rot90``).

Per-sample values stay on the CPU; what the device needs of them is copied there without a device
synchronisation (pinned memory, ``non_blocking``), so a batch can be augmented while the device runs.

:func:`apply_op` maps the ops of AutoAugment / RandAugment / TrivialAugmentWide (by name, with torchvision's
``magnitude`` convention) onto these kernels, as ``torchvision.transforms.v2._AutoAugmentBase`` does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Fill = float | Sequence[float] | None
Values = Tensor | Sequence[float] | float

#: Every op a policy can draw, by torchvision's names (``_AutoAugmentBase._apply_image_or_video_transform``).
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)

_BOUND = 255.0  # uint8


# ------------------------------------------------------------------------------------------------
# Helpers


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"expected a uint8 batch (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")


def _values(values: Values, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-sample values as a CPU tensor of shape (n,); a single number is used for every sample."""
    out = torch.as_tensor(values, dtype=dtype)
    if out.device.type != "cpu":
        out = out.cpu()  # a device tensor costs a synchronisation here; pass CPU values to avoid it
    if out.ndim == 0:
        out = out.expand(n)
    out = out.reshape(-1)
    if out.numel() != n:
        raise ValueError(f"expected {n} per-sample values, got {out.numel()}")
    return out


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without a device synchronisation (pinned memory, non-blocking copy)."""
    if device.type == "cpu":
        return values
    if device.type == "cuda":
        return values.contiguous().pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _per_sample(values: Tensor, images: Tensor, dtype: torch.dtype) -> Tensor:
    """(N,) CPU values as a (N, 1, 1, 1) tensor of ``dtype`` on the images' device (float64 → float32 rounds
    to nearest, as Python's float does when torchvision passes a Python number to a float32 kernel)."""
    return to_device(values.to(dtype), images.device).view(-1, 1, 1, 1)


def _exact_float64(device: torch.device) -> bool:
    return device.type != "mps"  # MPS has no float64


def _fused_blend(first: Tensor, other: Tensor, alpha: Tensor) -> Tensor:
    """float32 ``first + alpha * other`` rounded once, as ``first.add_(other, alpha=alpha)`` computes it in ATen
    (a fused multiply-add in its vectorised CPU kernels and in CUDA's): the float32 × float32 product is exact
    in float64, and so is the sum for pixel values unless ``alpha`` is below about 2**-20 (a factor within 1e-6
    of 1); even then the result differs only if that float64 rounding lands exactly on a float32 tie.
    A separate float32 multiply and add (no float64: MPS) differs from torchvision by 1 in rare pixels."""
    if not _exact_float64(first.device):
        return first + alpha * other
    return (first.double() + alpha.double() * other.double()).float()


def _blend(image: Tensor, other: Tensor, ratios: Tensor) -> Tensor:
    """torchvision's ``_blend(image, other, ratio)`` for uint8 ``image`` with a per-sample ratio (float64, CPU)."""
    ratio = _per_sample(ratios, image, torch.float32)
    alpha = _per_sample(1.0 - ratios, image, torch.float32)  # 1 - ratio in double, then float32, as torchvision
    output = _fused_blend(image.to(torch.float32).mul(ratio), other, alpha)
    return output.clamp_(0, _BOUND).to(image.dtype)


def _grayscale(image: Tensor) -> Tensor:
    """float32 luma (N, 1, H, W), floored, as torchvision's ``_rgb_to_grayscale_image(preserve_dtype=False)``
    followed by ``floor_()`` (the same op sequence, so the same rounding)."""
    r, g, b = image.unbind(dim=-3)
    luma = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)
    return luma.unsqueeze(dim=-3).floor_()


def _check_channels(images: Tensor) -> int:
    c = images.shape[-3]
    if c not in (1, 3):
        raise TypeError(f"images must have 1 or 3 channels, found {c}")
    return c


def _check_non_negative(name: str, values: Tensor) -> None:
    if values.numel() and bool((values < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {values.min().item()}")


# ------------------------------------------------------------------------------------------------
# Colour ops (each equal to torchvision.transforms.v2.functional.<name> per sample)


def adjust_brightness(images: Tensor, factors: Values) -> Tensor:
    """``F.adjust_brightness(image, f)`` per sample: ``image * f``, clamped."""
    _check_images(images)
    _check_channels(images)
    factors = _values(factors, images.shape[0])
    _check_non_negative("brightness factors", factors)
    output = images.to(torch.float32).mul(_per_sample(factors, images, torch.float32))
    return output.clamp_(0, _BOUND).to(torch.uint8)


def adjust_saturation(images: Tensor, factors: Values) -> Tensor:
    """``F.adjust_saturation(image, f)`` per sample: a blend with the (floored) greyscale image."""
    _check_images(images)
    factors = _values(factors, images.shape[0])
    _check_non_negative("saturation factors", factors)
    if _check_channels(images) == 1:
        return images.clone()
    return _blend(images, _grayscale(images), factors)


def adjust_contrast(images: Tensor, factors: Values) -> Tensor:
    """``F.adjust_contrast(image, f)`` per sample: a blend with the mean of the greyscale image."""
    _check_images(images)
    factors = _values(factors, images.shape[0])
    _check_non_negative("contrast factors", factors)
    grey = _grayscale(images) if _check_channels(images) == 3 else images.to(torch.float32)
    mean = torch.mean(grey, dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factors)


def adjust_sharpness(images: Tensor, factors: Values) -> Tensor:
    """``F.adjust_sharpness(image, f)`` per sample: a blend of the interior with a 3x3 smoothing (weights 1/13,
    centre 5/13), rounded; the one-pixel border is kept.

    torchvision rounds a float32 convolution; the exact value is ``S / 13`` for an integer ``S`` (the weighted
    sum), which is never within 1/26 of a rounding tie, so the rounded blur is ``round(S / 13)`` computed in
    integers here, whatever order a convolution would sum in.
    """
    _check_images(images)
    _check_channels(images)
    factors = _values(factors, images.shape[0])
    _check_non_negative("sharpness factors", factors)
    h, w = images.shape[-2:]
    if images.numel() == 0 or h <= 2 or w <= 2:
        return images.clone()
    x = images.to(torch.int32)
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy : h - 2 + dy, dx : w - 2 + dx]
    blurred = torch.div(2 * total + 13, 26, rounding_mode="floor")  # round(total / 13), never a tie
    centre = x[..., 1:-1, 1:-1]
    alpha = _per_sample(1.0 - factors, images, torch.float32)
    inner = _fused_blend(centre.to(torch.float32), (blurred - centre).to(torch.float32), alpha)
    output = images.to(torch.float32)
    output[..., 1:-1, 1:-1] = inner
    return output.clamp_(0, _BOUND).to(torch.uint8)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    """torchvision's ``_rgb_to_hsv`` (the same op sequence; min and max are exact in any order)."""
    r, g, b = image.unbind(dim=-3)
    minc = torch.minimum(torch.minimum(r, g), b)  # = torch.aminmax(image, dim=-3), exactly, and faster
    maxc = torch.maximum(torch.maximum(r, g), b)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    channels_range_divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / channels_range_divisor).unbind(dim=-3)
    mask_maxc_neq_r = maxc != r
    mask_maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(mask_maxc_eq_g & mask_maxc_neq_r)
    hr = bc.sub_(gc).mul_(~mask_maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(mask_maxc_neq_r.logical_and_(mask_maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb)
    h = h.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(img: Tensor) -> Tensor:
    """torchvision's ``_hsv_to_rgb`` (the same op sequence)."""
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)
    select = to_device(select, img.device)[:, i].moveaxis(0, -3)
    return vpqt.gather(-3, select)


def adjust_hue(images: Tensor, factors: Values) -> Tensor:
    """``F.adjust_hue(image, f)`` per sample (f in [-0.5, 0.5]): a rotation of the hue in HSV space."""
    _check_images(images)
    factors = _values(factors, images.shape[0])
    if factors.numel() and not bool(((factors >= -0.5) & (factors <= 0.5)).all()):
        raise ValueError(f"hue factors must lie in [-0.5, 0.5], got {factors.tolist()}")
    if _check_channels(images) == 1 or images.numel() == 0:
        return images.clone()
    image = images.to(torch.float32).mul_(1.0 / _BOUND)
    hsv = _rgb_to_hsv(image)
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(_per_sample(factors, images, torch.float32).squeeze(1)).remainder_(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return rgb.mul(_BOUND + 1.0 - 1e-3).to(torch.uint8)


def posterize(images: Tensor, bits: Values) -> Tensor:
    """``F.posterize(image, b)`` per sample: keep the ``b`` high bits (0 ≤ b ≤ 8)."""
    _check_images(images)
    bits = _values(bits, images.shape[0], torch.int64)
    if bits.numel() and not bool(((bits >= 0) & (bits <= 8)).all()):
        raise ValueError(f"bits must lie in [0, 8], got {bits.tolist()}")
    masks = ((255 << (8 - bits)) & 255).to(torch.uint8)
    return images & to_device(masks, images.device).view(-1, 1, 1, 1)


def solarize(images: Tensor, thresholds: Values) -> Tensor:
    """``F.solarize(image, t)`` per sample: invert the pixels ``>= t`` (compared in float32, as torchvision's
    uint8 tensor against a Python float is)."""
    _check_images(images)
    thresholds = _values(thresholds, images.shape[0])
    if thresholds.numel() and bool((thresholds > _BOUND).any()):
        raise ValueError(f"thresholds must be at most {_BOUND:g}, got {thresholds.max().item()}")
    above = images.to(torch.float32) >= _per_sample(thresholds, images, torch.float32)
    return torch.where(above, images.bitwise_not(), images)


def autocontrast(images: Tensor) -> Tensor:
    """``F.autocontrast(image)`` for every image: each channel stretched to [0, 255]."""
    _check_images(images)
    _check_channels(images)
    if images.numel() == 0:
        return images.clone()
    float_image = images.to(torch.float32)
    minimum = float_image.amin(dim=(-2, -1), keepdim=True)
    maximum = float_image.amax(dim=(-2, -1), keepdim=True)
    eq_idxs = maximum == minimum
    inv_scale = maximum.sub_(minimum).mul_(1.0 / _BOUND)
    minimum[eq_idxs] = 0.0
    inv_scale[eq_idxs] = 1.0
    return float_image.sub_(minimum).div_(inv_scale).clamp_(0, _BOUND).to(torch.uint8)


def equalize(images: Tensor) -> Tensor:
    """``F.equalize(image)`` for every image: per-channel histogram equalisation (PIL's look-up table)."""
    _check_images(images)
    if images.numel() == 0:
        return images.clone()
    batch_shape = images.shape[:-2]
    flat_image = images.flatten(start_dim=-2).to(torch.long)
    hist = flat_image.new_zeros(batch_shape + (256,), dtype=torch.int32)
    hist.scatter_add_(dim=-1, index=flat_image, src=hist.new_ones(1).expand_as(flat_image))
    cum_hist = hist.cumsum(dim=-1)
    index = cum_hist.argmax(dim=-1)
    num_non_max_pixels = flat_image.shape[-1] - hist.gather(dim=-1, index=index.unsqueeze_(-1))
    step = num_non_max_pixels.div_(255, rounding_mode="floor")
    valid_equalization = step.ne(0).unsqueeze_(-1)
    cum_hist = cum_hist[..., :-1]
    cum_hist.add_(step // 2).div_(step.clamp_(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = cum_hist.to(torch.uint8)
    lut = torch.cat([lut.new_zeros(1).expand(batch_shape + (1,)), lut], dim=-1)
    equalized_image = lut.gather(dim=-1, index=flat_image).view_as(images)
    return torch.where(valid_equalization, equalized_image, images)


def invert(images: Tensor) -> Tensor:
    """``F.invert(image)``: ``255 - image``."""
    _check_images(images)
    return images.bitwise_not()


# ------------------------------------------------------------------------------------------------
# Geometric ops: torchvision's matrices and grids per distinct parameter, one grid_sample per call


def inverse_affine_matrix(
    center: Sequence[float], angle: float, translate: Sequence[float], scale: float, shear: Sequence[float]
) -> tuple[float, ...]:
    """torchvision's ``_get_inverse_affine_matrix(center, angle, translate, scale, shear)`` (inverted=True),
    the same Python-float arithmetic: output pixel → input pixel, relative to the image centre."""
    rot = math.radians(angle)
    sx = math.radians(shear[0])
    sy = math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy = math.cos(sy)
    tan_sx = math.tan(sx)
    rot_minus_sy = rot - sy
    cx_plus_tx = cx + tx
    cy_plus_ty = cy + ty
    a = math.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot_minus_sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    matrix = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    matrix[2] += cx - matrix[0] * cx_plus_tx - matrix[1] * cy_plus_ty
    matrix[5] += cy - matrix[3] * cx_plus_tx - matrix[4] * cy_plus_ty
    return tuple(matrix)


def _affine_grid(theta: Tensor, w: int, h: int) -> Tensor:
    """torchvision's ``_affine_grid(theta, w, h, ow=w, oh=h)`` (the same float32 ops, hence the same bits)."""
    dtype, device = theta.dtype, theta.device
    base_grid = torch.empty(1, h, w, 3, dtype=dtype, device=device)
    x_grid = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device)
    base_grid[..., 0].copy_(x_grid)
    y_grid = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1)
    base_grid[..., 1].copy_(y_grid)
    base_grid[..., 2].fill_(1)
    rescaled_theta = theta.transpose(1, 2).div_(torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=device))
    output_grid = base_grid.view(1, h * w, 3).bmm(rescaled_theta)
    return output_grid.view(1, h, w, 2)


_GRID_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_GRID_CACHE_BYTES = 64 * 2**20  # about 2000 grids of 32x32, 80 of 224x224
_grid_cache_used = 0


def _grid(matrix: tuple[float, ...], h: int, w: int, device: torch.device) -> Tensor:
    """The (1, h, w, 2) sampling grid of ``matrix``, made as torchvision makes it on ``device``, cached.

    A policy draws from a finite set of magnitudes, so its grids are made once; the grid is not built in
    batch because ``bmm`` on a batch need not round as it does on torchvision's batch of one.
    """
    global _grid_cache_used
    key = (matrix, h, w, device)
    grid = _GRID_CACHE.get(key)
    if grid is not None:
        _GRID_CACHE.move_to_end(key)
        return grid
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    grid = _affine_grid(to_device(theta, device), w=w, h=h)
    _GRID_CACHE[key] = grid
    _grid_cache_used += grid.numel() * grid.element_size()
    while _grid_cache_used > _GRID_CACHE_BYTES and len(_GRID_CACHE) > 1:
        _, old = _GRID_CACHE.popitem(last=False)
        _grid_cache_used -= old.numel() * old.element_size()
    return grid


def _fill_values(fill: Fill, channels: int) -> list[float] | None:
    """torchvision's fill as a list of floats, or None when it is 0 everywhere (zero padding gives the same)."""
    if fill is None:
        return None
    values = [float(v) for v in fill] if isinstance(fill, Sequence) else [float(fill)]
    if len(values) not in (1, channels):
        raise ValueError(f"fill has {len(values)} values; the images have {channels} channels")
    return None if all(v == 0.0 for v in values) else values


def _warp(images: Tensor, matrices: list[tuple[float, ...]], fill: Fill) -> Tensor:
    """torchvision's ``_apply_grid_transform`` (nearest) with each image's own matrix, in one ``grid_sample``."""
    n, c, h, w = images.shape
    if n == 0:
        return images.clone()
    grids = {m: _grid(m, h, w, images.device) for m in dict.fromkeys(matrices)}
    grid = torch.cat([grids[m] for m in matrices]) if n > 1 else grids[matrices[0]]
    float_img = images.to(torch.float32)
    fill_list = _fill_values(fill, c)
    if fill_list is not None:
        mask = torch.ones((n, 1, h, w), dtype=float_img.dtype, device=float_img.device)
        float_img = torch.cat((float_img, mask), dim=1)
    float_img = F.grid_sample(float_img, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill_list is not None:
        float_img, mask = torch.tensor_split(float_img, indices=(-1,), dim=-3)
        mask = mask.expand_as(float_img)
        fill_img = to_device(torch.tensor(fill_list, dtype=float_img.dtype), float_img.device).view(1, -1, 1, 1)
        float_img = torch.where(mask < 0.5, fill_img.expand_as(float_img), float_img)
    return float_img.round_().to(torch.uint8)


def _pairs(values: Tensor | Sequence[Sequence[float]] | None, n: int) -> Tensor:
    """(N, 2) float64 CPU values (zeros for None)."""
    if values is None:
        return torch.zeros(n, 2, dtype=torch.float64)
    return torch.as_tensor(values, dtype=torch.float64).cpu()


def affine(
    images: Tensor,
    angle: Values = 0.0,
    translate: Tensor | Sequence[Sequence[float]] | None = None,
    scale: Values = 1.0,
    shear: Tensor | Sequence[Sequence[float]] | None = None,
    center: Sequence[float] | None = None,
    fill: Fill = None,
) -> Tensor:
    """``F.affine(image, angle, translate, scale, shear, NEAREST, fill, center)`` per sample.

    ``angle`` and ``scale`` are (N,) or one number; ``translate`` and ``shear`` are (N, 2) (or None: zeros);
    ``center`` (pixel coordinates, one for the batch) defaults to the image centre, as torchvision's.
    """
    _check_images(images)
    n, _, h, w = images.shape
    angles = _values(angle, n).tolist()
    scales = _values(scale, n).tolist()
    translates = _pairs(translate, n)
    shears = _pairs(shear, n)
    if translates.shape != (n, 2) or shears.shape != (n, 2):
        raise ValueError(f"translate and shear must have shape ({n}, 2)")
    if any(s <= 0.0 for s in scales):
        raise ValueError("scale must be positive")
    center_f = [0.0, 0.0] if center is None else [float(c) - s * 0.5 for c, s in zip(center, (w, h), strict=True)]
    matrices = [
        inverse_affine_matrix(center_f, a, [float(t) for t in tr], s, sh)
        for a, tr, s, sh in zip(angles, translates.tolist(), scales, shears.tolist(), strict=True)
    ]
    return _warp(images, matrices, fill)


def rotate(images: Tensor, angle: Values, fill: Fill = None) -> Tensor:
    """``F.rotate(image, angle, NEAREST, expand=False, center=None, fill)`` per sample (degrees,
    counter-clockwise), with torchvision's fast paths: 0° is a copy, 180° (and 90°/270° on a square image)
    a ``rot90``."""
    _check_images(images)
    n, _, h, w = images.shape
    angles = [a % 360 for a in _values(angle, n).tolist()]  # Python's %, as torchvision's
    turns = {0.0: 0, 180.0: 2}
    if h == w:
        turns.update({90.0: 1, 270.0: 3})
    kinds = [turns.get(a, -1) for a in angles]
    if all(k == -1 for k in kinds):
        return _warp(images, [inverse_affine_matrix([0.0, 0.0], -a, [0.0, 0.0], 1.0, [0.0, 0.0]) for a in angles], fill)
    output = images.clone()
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        index = to_device(torch.tensor(rows, dtype=torch.long), images.device)
        part = images.index_select(0, index)
        if kind == -1:
            mats = [inverse_affine_matrix([0.0, 0.0], -angles[i], [0.0, 0.0], 1.0, [0.0, 0.0]) for i in rows]
            part = _warp(part, mats, fill)
        elif kind:
            part = torch.rot90(part, k=kind, dims=(-2, -1))
        else:
            continue
        output.index_copy_(0, index, part)
    return output


def _shear(images: Tensor, magnitudes: Values, fill: Fill, axis: int) -> Tensor:
    """AutoAugment's ShearX / ShearY: ``F.affine`` with shear ``degrees(atan(m))`` about the top-left corner."""
    n = images.shape[0]
    degrees = [math.degrees(math.atan(m)) for m in _values(magnitudes, n).tolist()]
    shear = [[d, 0.0] if axis == 0 else [0.0, d] for d in degrees]
    return affine(images, 0.0, None, 1.0, torch.tensor(shear, dtype=torch.float64).reshape(n, 2), [0, 0], fill)


def shear_x(images: Tensor, magnitudes: Values, fill: Fill = None) -> Tensor:
    """torchvision's ShearX op per sample (magnitude ``m``: x' = x + m·y about the top-left corner)."""
    return _shear(images, magnitudes, fill, 0)


def shear_y(images: Tensor, magnitudes: Values, fill: Fill = None) -> Tensor:
    """torchvision's ShearY op per sample."""
    return _shear(images, magnitudes, fill, 1)


def _translate(images: Tensor, pixels: Values, fill: Fill, axis: int) -> Tensor:
    """AutoAugment's TranslateX / TranslateY: ``F.affine`` with translate ``int(m)`` pixels."""
    n = images.shape[0]
    offsets = torch.zeros(n, 2, dtype=torch.float64)
    offsets[:, axis] = torch.tensor([float(int(p)) for p in _values(pixels, n).tolist()], dtype=torch.float64)
    return affine(images, 0.0, offsets, 1.0, None, None, fill)


def translate_x(images: Tensor, pixels: Values, fill: Fill = None) -> Tensor:
    """torchvision's TranslateX op per sample (``int(pixels)``, truncated, positive to the right)."""
    return _translate(images, pixels, fill, 0)


def translate_y(images: Tensor, pixels: Values, fill: Fill = None) -> Tensor:
    """torchvision's TranslateY op per sample (``int(pixels)``, positive downwards)."""
    return _translate(images, pixels, fill, 1)


# ------------------------------------------------------------------------------------------------
# The auto-augment ops by name


def apply_op(name: str, images: Tensor, magnitudes: Values, fill: Fill = None) -> Tensor:
    """torchvision's ``_AutoAugmentBase._apply_image_or_video_transform(image, name, magnitude, NEAREST, fill)``
    for every image with its own (signed) magnitude. Returns a new tensor."""
    n = images.shape[0]
    m = _values(magnitudes, n)
    if name == "Identity":
        return images.clone()
    if name == "ShearX":
        return shear_x(images, m, fill)
    if name == "ShearY":
        return shear_y(images, m, fill)
    if name == "TranslateX":
        return translate_x(images, m, fill)
    if name == "TranslateY":
        return translate_y(images, m, fill)
    if name == "Rotate":
        return rotate(images, m, fill)
    if name == "Brightness":
        return adjust_brightness(images, 1.0 + m)
    if name == "Color":
        return adjust_saturation(images, 1.0 + m)
    if name == "Contrast":
        return adjust_contrast(images, 1.0 + m)
    if name == "Sharpness":
        return adjust_sharpness(images, 1.0 + m)
    if name == "Posterize":
        return posterize(images, m.trunc().to(torch.int64))
    if name == "Solarize":
        return solarize(images, _BOUND * m)
    if name == "AutoContrast":
        return autocontrast(images)
    if name == "Equalize":
        return equalize(images)
    if name == "Invert":
        return invert(images)
    raise ValueError(f"unknown op {name!r}; the ops are {', '.join(OPS)}")


def apply_grouped(
    images: Tensor, op_names: Sequence[str], ops: Tensor, magnitudes: Tensor, fill: Fill = None
) -> Tensor:
    """One op per sample: image ``i`` gets ``op_names[ops[i]]`` with magnitude ``magnitudes[i]`` (CPU tensors).

    The samples are grouped by op (on the CPU, so without a device synchronisation); each group is gathered,
    transformed by one batched call, and written back. Returns a new tensor.
    """
    ops = ops.reshape(-1).cpu()
    present = torch.unique(ops).tolist()
    if len(present) == 1:
        return apply_op(op_names[present[0]], images, magnitudes, fill)
    output = images.clone()
    for op in present:
        name = op_names[op]
        if name == "Identity":
            continue
        rows = torch.nonzero(ops == op).reshape(-1)
        index = to_device(rows, images.device)
        part = apply_op(name, images.index_select(0, index), magnitudes[rows], fill)
        output.index_copy_(0, index, part)
    return output
