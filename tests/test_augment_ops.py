"""Per-sample augmentation ops and policies on a uint8 batch: pixel-equal to torchvision's functional ops.

Every op and every policy is compared with torchvision applied to each image on its own, with that image's
drawn op and magnitude (torchvision's own op code, ``_AutoAugmentBase._apply_image_or_video_transform``, and
its own magnitude tables and sub-policies). Draws come only from the generator given; their frequencies are
checked by counting (no clock), with loose chi-square bounds.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import AutoAugmentPolicy, InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ib_plugins_builtin.augmentations import _ops
from ib_plugins_builtin.augmentations._policies import (
    AutoAugment,
    ColorJitter,
    Cutout,
    Policy,
    RandAugment,
    TrivialAugmentWide,
)

SHAPES = [(3, 32, 32), (1, 28, 28), (3, 24, 32)]  # CIFAR, MNIST, and a non-square image (no 90° fast path)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int = 16, shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0) -> torch.Tensor:
    """Random uint8 images, with a few edge cases: a constant image (autocontrast and equalize leave it), a
    low-contrast one and a dark one."""
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator(seed))
    if n >= 4:
        images[1] = 7
        images[2] = images[2] // 4 + 100
        images[3] = images[3] // 8
    return images


def tv_op(image: torch.Tensor, name: str, magnitude: float, fill: object) -> torch.Tensor:
    """torchvision's own op, as its AutoAugment / RandAugment / TrivialAugmentWide apply it to one image."""
    transform = T.AutoAugment(fill=fill)  # type: ignore[arg-type]
    return transform._apply_image_or_video_transform(
        image, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=transform._fill
    )


def tv_magnitude(space: dict, name: str, num_bins: int, bin_: int, negate: bool, height: int, width: int) -> float:
    """The magnitude torchvision passes to op ``name`` for this bin and sign (its _AUGMENTATION_SPACE)."""
    magnitudes_fn, signed = space[name]
    magnitudes = magnitudes_fn(num_bins, height, width)
    if magnitudes is None:
        return 0.0
    magnitude = float(magnitudes[bin_])
    return -magnitude if signed and negate else magnitude


def all_magnitudes(name: str, height: int, width: int) -> list[float]:
    """Every magnitude any of torchvision's three policies can pass to op ``name`` (both signs), at this size."""
    values: set[float] = set()
    for cls, bins in ((T.AutoAugment, 10), (T.RandAugment, 31), (T.TrivialAugmentWide, 31)):
        if name not in cls._AUGMENTATION_SPACE:
            continue
        for b in range(bins):
            for negate in (False, True):
                values.add(tv_magnitude(cls._AUGMENTATION_SPACE, name, bins, b, negate, height, width))
    return sorted(values) or [0.0]


def chi_square(counts: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic against a uniform distribution, and its degrees of freedom."""
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1


def assert_uniform(counts: np.ndarray) -> None:
    """A loose bound: the statistic stays below dof + 6 sd of the chi-square (its sd is sqrt(2 dof))."""
    statistic, dof = chi_square(np.asarray(counts, dtype=float))
    assert statistic < dof + 6 * math.sqrt(2 * dof), (statistic, dof, counts)


def assert_pixel_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    if not torch.equal(ours, theirs):
        diff = (ours.int() - theirs.int()).abs()
        rows = sorted({int(i) for i in torch.nonzero(diff)[:, 0]})
        raise AssertionError(f"max |diff| {int(diff.max())} in {int((diff > 0).sum())} pixels, samples {rows}")


# ------------------------------------------------------------------------------------------------
# Ops: every op, every magnitude a policy can draw, pixel-equal to torchvision per sample


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "mnist", "wide"])
@pytest.mark.parametrize("name", _ops.OPS)
def test_each_op_equals_torchvision_per_sample(name: str, shape: tuple[int, int, int]) -> None:
    _, h, w = shape
    magnitudes = all_magnitudes(name, h, w)
    base = random_images(16, shape, seed=1)
    images = base[torch.arange(len(magnitudes)) % 16]  # 16 images, cycled over every magnitude
    geometric = name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    fills = [0, [10.0, 200.0, 30.0] if shape[0] == 3 else 77] if geometric else [0]
    for fill in fills:
        ours = _ops.apply_op(name, images, torch.tensor(magnitudes, dtype=torch.float64), fill)
        theirs = torch.stack([tv_op(images[i], name, m, fill) for i, m in enumerate(magnitudes)])
        assert_pixel_equal(ours, theirs)


def test_per_sample_ops_see_only_their_own_image() -> None:
    """A sample's result does not depend on the others in its group (it equals the op on a batch of one)."""
    images = random_images(16)
    magnitudes = torch.linspace(-30.0, 30.0, 16, dtype=torch.float64)
    whole = _ops.apply_op("Rotate", images, magnitudes, 0)
    for i in (0, 5, 15):
        assert torch.equal(whole[i : i + 1], _ops.apply_op("Rotate", images[i : i + 1], magnitudes[i : i + 1], 0))


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "mnist", "wide"])
def test_geometric_kernels_equal_torchvision_for_any_parameters(shape: tuple[int, int, int]) -> None:
    n = 16
    images = random_images(n, shape, seed=2)
    rng = generator(3)
    angles = ((torch.rand(n, generator=rng, dtype=torch.float64) - 0.5) * 720).tolist()
    angles[:5] = [90.0, -90.0, 180.0, 0.0, 270.0]  # torchvision's fast paths (rot90, copy)
    translate = ((torch.rand(n, 2, generator=rng, dtype=torch.float64) - 0.5) * 20).tolist()
    scale = (torch.rand(n, generator=rng, dtype=torch.float64) + 0.5).tolist()
    shear = ((torch.rand(n, 2, generator=rng, dtype=torch.float64) - 0.5) * 60).tolist()
    fill = [5.0] * shape[0]

    ours = _ops.rotate(images, angles, fill=fill)
    theirs = torch.stack([TF.rotate(images[i], angles[i], fill=fill) for i in range(n)])
    assert_pixel_equal(ours, theirs)

    for center in (None, [3.0, 4.0]):
        ours = _ops.affine(images, angles, translate, scale, shear, center=center, fill=fill)
        theirs = torch.stack(
            [
                TF.affine(images[i], angles[i], translate[i], scale[i], shear[i], fill=fill, center=center)
                for i in range(n)
            ]
        )
        assert_pixel_equal(ours, theirs)


def test_inverse_affine_matrix_is_torchvisions() -> None:
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

    rng = random.Random(0)
    for _ in range(200):
        center = [rng.uniform(-20, 20), rng.uniform(-20, 20)]
        translate = [rng.uniform(-10, 10), rng.uniform(-10, 10)]
        shear = [rng.uniform(-45, 45), rng.uniform(-45, 45)]
        angle, scale = rng.uniform(-360, 360), rng.uniform(0.5, 2.0)
        assert _ops.inverse_affine_matrix(center, angle, translate, scale, shear) == tuple(
            _get_inverse_affine_matrix(center, angle, translate, scale, shear)
        )


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "mnist", "wide"])
def test_colour_kernels_equal_torchvision_for_any_factor(shape: tuple[int, int, int]) -> None:
    n = 16
    images = random_images(n, shape, seed=4)
    rng = generator(5)
    factors = (torch.rand(n, generator=rng, dtype=torch.float32) * 2).double()  # float32 draws, like ColorJitter
    factors[0] = 0.0
    hues = (torch.rand(n, generator=rng, dtype=torch.float32) - 0.5).double()
    bits = torch.arange(n) % 9
    thresholds = torch.rand(n, generator=rng, dtype=torch.float64) * 255
    thresholds[:3] = torch.tensor([0.0, 255.0, 127.5])
    cases = [
        (_ops.adjust_brightness, TF.adjust_brightness, factors),
        (_ops.adjust_saturation, TF.adjust_saturation, factors),
        (_ops.adjust_contrast, TF.adjust_contrast, factors),
        (_ops.adjust_sharpness, TF.adjust_sharpness, factors),
        (_ops.adjust_hue, TF.adjust_hue, hues),
        (_ops.posterize, TF.posterize, bits),
        (_ops.solarize, TF.solarize, thresholds),
    ]
    for ours_fn, theirs_fn, values in cases:
        ours = ours_fn(images, values)
        theirs = torch.stack([theirs_fn(images[i], values[i].item()) for i in range(n)])
        assert_pixel_equal(ours, theirs)
    for ours_fn, theirs_fn in ((_ops.autocontrast, TF.autocontrast), (_ops.equalize, TF.equalize)):
        assert_pixel_equal(ours_fn(images), torch.stack([theirs_fn(image) for image in images]))
    assert_pixel_equal(_ops.invert(images), TF.invert(images))


def test_ops_do_not_change_their_input() -> None:
    images = random_images(16)
    before = images.clone()
    for name in _ops.OPS:
        _ops.apply_op(name, images, torch.full((16,), 0.3, dtype=torch.float64), 9)
    assert torch.equal(images, before)


def test_bad_parameters_are_refused() -> None:
    images = random_images(4)
    with pytest.raises(ValueError, match="non-negative"):
        _ops.adjust_brightness(images, [-0.1, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="hue"):
        _ops.adjust_hue(images, 0.6)
    with pytest.raises(ValueError, match="bits"):
        _ops.posterize(images, 9)
    with pytest.raises(ValueError, match="4 per-sample values"):
        _ops.solarize(images, [1.0, 2.0])
    with pytest.raises(TypeError, match="uint8"):
        _ops.invert(images.float())
    with pytest.raises(ValueError, match="unknown op"):
        _ops.apply_op("Blur", images, 0.0)


# ------------------------------------------------------------------------------------------------
# Policies


def autoaugment_reference(policy: AutoAugment, images: torch.Tensor, draws: dict, fill: object) -> torch.Tensor:
    """torchvision's AutoAugment.forward per image, its random choices replaced by the sample's draws."""
    tv = T.AutoAugment(AutoAugmentPolicy(policy.policy))
    space = T.AutoAugment._AUGMENTATION_SPACE
    _, h, w = images.shape[1:]
    out = []
    for i, image in enumerate(images):
        sub = tv._policies[int(draws["sub_policy"][i])]
        for k, (name, _, magnitude_idx) in enumerate(sub):
            if not bool(draws["apply"][i, k]):
                continue
            negate = bool(draws["negate"][i, k])
            magnitude = 0.0 if magnitude_idx is None else tv_magnitude(space, name, 10, magnitude_idx, negate, h, w)
            image = tv_op(image, name, magnitude, fill)
        out.append(image)
    return torch.stack(out)


def op_list_reference(cls: type, num_bins: int, images: torch.Tensor, draws: dict, fill: object) -> torch.Tensor:
    """torchvision's RandAugment / TrivialAugmentWide forward per image with the sample's drawn ops and bins."""
    space = cls._AUGMENTATION_SPACE
    names = list(space)
    _, h, w = images.shape[1:]
    out = []
    for i, image in enumerate(images):
        for k in range(draws["op"].shape[1]):
            name = names[int(draws["op"][i, k])]
            magnitude = tv_magnitude(space, name, num_bins, int(draws["bin"][i, k]), bool(draws["negate"][i, k]), h, w)
            image = tv_op(image, name, magnitude, fill)
        out.append(image)
    return torch.stack(out)


def jitter_reference(jitter: ColorJitter, args: dict, images: torch.Tensor, draws: dict) -> torch.Tensor:
    """torchvision's ColorJitter.transform per image with the sample's order and factors."""
    tv = T.ColorJitter(**args)
    out = []
    for i, image in enumerate(images):
        params = {
            "fn_idx": draws["order"][i],
            **{f"{name}_factor": float(draws[name][i]) if name in draws else None for name in jitter._NAMES},
        }
        out.append(tv.transform(image, params))
    return torch.stack(out)


def cutout_reference(length: int, images: torch.Tensor, draws: dict, fill: float) -> torch.Tensor:
    """github.com/uoguelph-mlrg/Cutout util/cutout.py per image, its np.random centre replaced by the draws."""
    n, _, h, w = images.shape
    out = images.clone()
    for i in range(n):
        mask = np.ones((h, w), np.float32)
        for u in draws["centre"][i].tolist():
            y, x = int(math.floor(u[0] * h)), int(math.floor(u[1] * w))
            y1 = np.clip(y - length // 2, 0, h)
            y2 = np.clip(y + length // 2, 0, h)
            x1 = np.clip(x - length // 2, 0, w)
            x2 = np.clip(x + length // 2, 0, w)
            mask[y1:y2, x1:x2] = 0.0
        cut = torch.from_numpy(mask == 0).expand_as(images[i])
        out[i][cut] = torch.tensor(fill).to(images.dtype)
    return out


AUTOAUGMENT_POLICIES = ["cifar10", "imagenet", "svhn"]


@pytest.mark.parametrize("fill", [0, [128, 64, 32]], ids=["fill0", "fillrgb"])
@pytest.mark.parametrize("name", AUTOAUGMENT_POLICIES)
def test_autoaugment_equals_torchvision_per_sample(name: str, fill: object) -> None:
    policy = AutoAugment(name, fill=fill)
    images = random_images(64, seed=6)
    draws = policy.draw(64, generator(7))
    assert_pixel_equal(policy.apply(images, draws), autoaugment_reference(policy, images, draws, fill))


@pytest.mark.parametrize("shape", SHAPES, ids=["cifar", "mnist", "wide"])
@pytest.mark.parametrize(
    "cls, kwargs, num_bins",
    [
        (RandAugment, {}, 31),
        (RandAugment, {"num_ops": 3, "magnitude": 30}, 31),
        (RandAugment, {"num_ops": 1, "magnitude": 4, "num_magnitude_bins": 10}, 10),
        (TrivialAugmentWide, {}, 31),
        (TrivialAugmentWide, {"num_magnitude_bins": 7}, 7),
    ],
    ids=["rand", "rand3x30", "rand10bins", "trivial", "trivial7bins"],
)
def test_op_list_policies_equal_torchvision_per_sample(cls, kwargs, num_bins, shape) -> None:
    fill = 9 if shape[0] == 1 else [9, 99, 199]
    policy = cls(**kwargs, fill=fill)
    assert policy.op_names == tuple(getattr(T, cls.__name__)._AUGMENTATION_SPACE)
    images = random_images(64, shape, seed=8)
    draws = policy.draw(64, generator(9))
    expected = op_list_reference(getattr(T, cls.__name__), num_bins, images, draws, fill)
    assert_pixel_equal(policy.apply(images, draws), expected)


def test_autoaugment_tables_are_torchvisions() -> None:
    for name in AUTOAUGMENT_POLICIES:
        policy = AutoAugment(name)
        assert policy.sub_policies == T.AutoAugment(AutoAugmentPolicy(name))._policies
        assert policy.op_names == tuple(T.AutoAugment._AUGMENTATION_SPACE)


JITTERS = [
    {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    {"brightness": (0.2, 1.9), "hue": (-0.5, 0.5)},
    {"contrast": 0.8, "saturation": 0.0},
]


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["cifar", "mnist"])
@pytest.mark.parametrize("args", JITTERS, ids=["simclr", "brightness_hue", "contrast"])
def test_color_jitter_equals_torchvision_per_sample(args: dict, shape: tuple[int, int, int]) -> None:
    jitter = ColorJitter(**args)
    images = random_images(32, shape, seed=10)
    draws = jitter.draw(32, generator(11))
    assert_pixel_equal(jitter.apply(images, draws), jitter_reference(jitter, args, images, draws))


@pytest.mark.parametrize("length, n_holes", [(16, 1), (8, 3), (7, 2), (40, 1)])
def test_cutout_equals_the_original_per_sample(length: int, n_holes: int) -> None:
    images = random_images(32, seed=12)
    for fill in (0, 200):
        cutout = Cutout(length=length, n_holes=n_holes, fill=fill, normalised=False)
        draws = cutout.draw(32, generator(13))
        assert_pixel_equal(cutout.apply(images, draws), cutout_reference(length, images, draws, fill))
    # the original's placement: the normalised batch times the mask (a hole is 0, the mean colour)
    cutout = Cutout(length=length, n_holes=n_holes)
    assert cutout.normalised
    normalised = (images.float() / 255 - 0.5) / 0.25
    draws = cutout.draw(32, generator(13))
    keep = torch.from_numpy(np.stack([cutout_mask(length, draws["centre"][i], 32, 32) for i in range(32)]))
    assert torch.equal(cutout.apply(normalised, draws), normalised * keep[:, None])


def cutout_mask(length: int, centres: torch.Tensor, h: int, w: int) -> np.ndarray:
    mask = np.ones((h, w), np.float32)
    for u in centres.tolist():
        y, x = int(math.floor(u[0] * h)), int(math.floor(u[1] * w))
        mask[
            np.clip(y - length // 2, 0, h) : np.clip(y + length // 2, 0, h),
            np.clip(x - length // 2, 0, w) : np.clip(x + length // 2, 0, w),
        ] = 0.0
    return mask


def policies() -> list[object]:
    return [
        AutoAugment("cifar10"),
        AutoAugment("imagenet"),
        AutoAugment("svhn"),
        RandAugment(),
        TrivialAugmentWide(),
        ColorJitter(0.4, 0.4, 0.4, 0.1),
        Cutout(16, normalised=False),
    ]


POLICY_IDS = ["aa_cifar10", "aa_imagenet", "aa_svhn", "rand", "trivial", "jitter", "cutout"]


@pytest.mark.parametrize("policy", policies(), ids=POLICY_IDS)
def test_policies_follow_the_protocol(policy) -> None:
    assert isinstance(policy, Policy)
    images = random_images(16)
    draws = policy.draw(16, generator(0))
    assert all(v.device.type == "cpu" and v.shape[0] == 16 for v in draws.values())
    out = policy.apply(images, draws)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out is not images
    assert torch.equal(policy.apply(images, draws), out)  # apply is deterministic
    assert torch.equal(policy(images, generator(0)), out)  # __call__ = apply(draw)
    empty = policy.apply(images[:0], policy.draw(0, generator(0)))
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == torch.uint8


@pytest.mark.parametrize("policy", policies(), ids=POLICY_IDS)
def test_each_sample_gets_its_own_ops(policy) -> None:
    images = random_images(1, seed=14).expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    draws = policy.draw(16, generator(15))
    rows = {key: {tuple(np.atleast_1d(v[i].numpy()).ravel().tolist()) for i in range(16)} for key, v in draws.items()}
    constant = {"bin"} if isinstance(policy, RandAugment) else set()  # RandAugment: one magnitude for all
    assert all(len(rows[key]) > 1 for key in rows if key not in constant), rows  # two samples drew differently
    out = policy.apply(images, draws)
    assert len({bytes(image.numpy()) for image in out}) > 1  # and came out differently
    if "op" in draws:
        assert len({tuple(row) for row in draws["op"].tolist()}) > 1


@pytest.mark.parametrize("policy", policies(), ids=POLICY_IDS)
def test_a_shard_of_the_draws_augments_its_rows_as_the_whole_batch_does(policy) -> None:
    images = random_images(32, seed=16)
    draws = policy.draw(32, generator(17))
    whole = policy.apply(images, draws)
    for rank in range(2):
        shard = {k: v[rank::2] for k, v in draws.items()}
        assert torch.equal(policy.apply(images[rank::2], shard), whole[rank::2])


@pytest.mark.parametrize("policy", policies(), ids=POLICY_IDS)
def test_draws_come_only_from_the_generator(policy) -> None:
    first, again = policy.draw(64, generator(21)), policy.draw(64, generator(21))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = policy.draw(64, generator(22))
    assert any(not torch.equal(first[k], other[k]) for k in first)

    torch_state, numpy_state, python_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    rng = generator(23)
    drawn = policy.draw(64, rng)
    policy.apply(random_images(64), drawn)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
    assert not torch.equal(rng.get_state(), generator(23).get_state())  # the given generator was used


# ------------------------------------------------------------------------------------------------
# Distributions of the draws (counts, loose chi-square bounds)


@pytest.mark.parametrize("name", AUTOAUGMENT_POLICIES)
def test_autoaugment_draws_follow_torchvisions_distribution(name: str) -> None:
    policy = AutoAugment(name)
    n = 25 * 400
    draws = policy.draw(n, generator(31))
    assert_uniform(np.bincount(draws["sub_policy"].numpy(), minlength=25))  # randint(len(policies))
    probs = torch.tensor([[p for _, p, _ in sub] for sub in policy.sub_policies], dtype=torch.float64)
    expected = probs[draws["sub_policy"]]
    for k in range(2):  # each op applies with its probability: the count is a sum of Bernoullis
        mean, var = float(expected[:, k].sum()), float((expected[:, k] * (1 - expected[:, k])).sum())
        assert abs(float(draws["apply"][:, k].sum()) - mean) < 6 * math.sqrt(var)
    never = expected == 0.0  # probability 0 (e.g. cifar10's ("Invert", 0.0)): never applied
    assert not bool(draws["apply"][never].any())
    signed = torch.tensor([signed for _, signed in T.AutoAugment._AUGMENTATION_SPACE.values()])[draws["op"]]
    negated = int(draws["negate"][signed].sum())
    assert abs(negated - int(signed.sum()) / 2) < 6 * math.sqrt(int(signed.sum()) / 4)
    assert not bool(draws["negate"][~signed].any())


def test_randaugment_and_trivialaugment_ops_and_bins_are_uniform() -> None:
    rand = RandAugment(num_ops=2, magnitude=5)
    draws = rand.draw(7000, generator(32))
    assert_uniform(np.bincount(draws["op"].reshape(-1).numpy(), minlength=14))
    assert bool((draws["bin"] == 5).all())
    trivial = TrivialAugmentWide()
    draws = trivial.draw(14 * 31 * 20, generator(33))
    assert_uniform(np.bincount(draws["op"].reshape(-1).numpy(), minlength=14))
    assert_uniform(np.bincount(draws["bin"].reshape(-1).numpy(), minlength=31))


def test_color_jitter_orders_and_factors_follow_torchvisions_distribution() -> None:
    jitter = ColorJitter(brightness=0.4, contrast=(0.5, 1.5), saturation=0.2, hue=0.1)
    n = 24 * 300
    draws = jitter.draw(n, generator(34))
    assert bool((torch.sort(draws["order"], dim=1).values == torch.arange(4)).all())  # permutations of 0..3
    codes = (draws["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    assert_uniform(np.unique(codes.numpy(), return_counts=True)[1])  # all 24 orders, uniformly
    assert len(np.unique(codes.numpy())) == 24
    for name, (low, high) in (("brightness", (0.6, 1.4)), ("contrast", (0.5, 1.5)), ("saturation", (0.8, 1.2))):
        values = draws[name].numpy()
        assert values.min() >= low and values.max() <= high
        assert_uniform(np.histogram(values, bins=20, range=(low, high))[0])
    assert draws["hue"].abs().max() <= 0.1
    assert set(ColorJitter(brightness=0.3).draw(4, generator(0))) == {"order", "brightness"}


def test_cutout_centres_are_uniform_over_the_image() -> None:
    cutout = Cutout(16, n_holes=2)
    draws = cutout.draw(32 * 200, generator(35))
    boxes = cutout.boxes(draws, 32, 32)
    y = (draws["centre"][..., 0] * 32).floor().to(torch.int64)
    x = (draws["centre"][..., 1] * 32).floor().to(torch.int64)
    assert_uniform(np.bincount(y.reshape(-1).numpy(), minlength=32))
    assert_uniform(np.bincount(x.reshape(-1).numpy(), minlength=32))
    assert torch.equal(boxes[..., 0], (y - 8).clamp(0, 32)) and torch.equal(boxes[..., 1], (y + 8).clamp(0, 32))
    assert torch.equal(boxes[..., 2], (x - 8).clamp(0, 32)) and torch.equal(boxes[..., 3], (x + 8).clamp(0, 32))


def test_policy_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="policy"):
        AutoAugment("mnist")
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=31)
    with pytest.raises(ValueError, match="num_magnitude_bins"):
        TrivialAugmentWide(num_magnitude_bins=1)
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="fill"):
        AutoAugment(fill="grey")  # type: ignore[arg-type]
    assert AutoAugment(AutoAugmentPolicy.SVHN).policy == "svhn"
    assert Cutout(size=8).length == 8
    with pytest.raises(ValueError, match="samples"):
        RandAugment().apply(random_images(4), RandAugment().draw(3, generator(0)))


# ------------------------------------------------------------------------------------------------
# CUDA: the device path equals the CPU path and torchvision on the device


@CUDA
@pytest.mark.parametrize("policy", policies(), ids=POLICY_IDS)
def test_policies_on_cuda_equal_the_cpu(policy) -> None:
    images = random_images(64, seed=40)
    draws = policy.draw(64, generator(41))
    assert_pixel_equal(policy.apply(images.cuda(), draws).cpu(), policy.apply(images, draws))


@CUDA
@pytest.mark.parametrize("name", _ops.OPS)
def test_each_op_on_cuda_equals_torchvision_on_cuda(name: str) -> None:
    magnitudes = all_magnitudes(name, 32, 32)
    images = random_images(16, seed=42)[torch.arange(len(magnitudes)) % 16].cuda()
    for fill in (0, [10.0, 200.0, 30.0]):
        ours = _ops.apply_op(name, images, torch.tensor(magnitudes, dtype=torch.float64), fill)
        theirs = torch.stack([tv_op(images[i], name, m, fill) for i, m in enumerate(magnitudes)])
        assert_pixel_equal(ours.cpu(), theirs.cpu())
