"""Built-in samplers: the stated class distributions, determinism in (seed, epoch), offline resampling, sharding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import ibcore
from ibcore import BuildContext, ContextError, DataError
from ibcore.sampling import ShardedSampler, shard

# A synthetic long-tailed train split (imbalance ratio 50), labels in a scrambled order so that no
# sampler can rely on the data being sorted by class.
COUNTS = np.array([500, 200, 50, 10])
N = int(COUNTS.sum())
TARGETS = np.random.default_rng(123).permutation(np.repeat(np.arange(4), COUNTS))
EPOCHS = 20

ONLINE = ["class_balanced", "progressively_balanced", "effective_number", "reversed"]
ALL_SAMPLERS = ["instance", *ONLINE, "oversample", "undersample"]


def context(**changes: object) -> BuildContext:
    base = BuildContext.from_targets(TARGETS.tolist(), 4, epochs=EPOCHS, seed=7)
    return base.replace(**changes)


def build(name: str, params: dict | None = None, **changes: object):
    return ibcore.build("sampler", name, params or {}, context=context(**changes))


def empirical_class_frequencies(sampler, epochs) -> np.ndarray:
    labels = np.concatenate([TARGETS[sampler.indices(e)] for e in epochs])
    return np.bincount(labels, minlength=4) / labels.size


# ---------------------------------------------------------------------------------------------
# The stated distributions, computed here from the papers' formulas (not from the samplers).


def stated(name: str, params: dict) -> np.ndarray:
    n = COUNTS.astype(float)
    if name == "class_balanced":  # Kang et al. 2020: p_c ∝ n_c^q
        w = n ** params.get("q", 0.0)
    elif name == "effective_number":  # Cui et al. 2019: (1 - β) / (1 - β^n_c)
        beta = params.get("beta", 0.999)
        w = (1 - beta) / (1 - beta**n)
    elif name == "reversed":  # BBN, Zhou et al. 2020: n_max / n_c
        w = n.max() / n
    else:
        raise AssertionError(name)
    return w / w.sum()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("class_balanced", {}),
        ("class_balanced", {"q": 0.5}),
        ("class_balanced", {"q": 1.0}),
        ("effective_number", {}),
        ("effective_number", {"beta": 0.99}),
        ("reversed", {}),
    ],
)
def test_empirical_class_frequencies_match_the_stated_distribution(name: str, params: dict) -> None:
    sampler = build(name, params)
    expected = stated(name, params)
    np.testing.assert_allclose(sampler.class_probabilities(0), expected, rtol=1e-12)
    # 30 epochs × 760 draws: the standard error of each frequency is below 0.003.
    np.testing.assert_allclose(empirical_class_frequencies(sampler, range(30)), expected, atol=0.015)


def test_class_balanced_q0_draws_every_class_equally_and_reaches_every_rare_sample() -> None:
    sampler = build("class_balanced")
    drawn = np.concatenate([sampler.indices(e) for e in range(10)])
    np.testing.assert_allclose(np.bincount(TARGETS[drawn], minlength=4) / drawn.size, 0.25, atol=0.015)
    rarest = np.flatnonzero(TARGETS == 3)
    # Uniform within the class: every one of the 10 tail samples is drawn about 190 times in 10 epochs.
    per_sample = np.array([np.count_nonzero(drawn == i) for i in rarest])
    assert per_sample.min() > 120 and per_sample.max() < 270


def test_instance_sampler_is_a_permutation_each_epoch() -> None:
    sampler = build("instance")
    assert len(sampler) == sampler.num_samples == N
    for epoch in range(3):
        assert np.array_equal(np.sort(sampler.indices(epoch)), np.arange(N))
    np.testing.assert_allclose(sampler.class_probabilities(0), COUNTS / N)


def test_progressive_sampler_moves_from_instance_to_class_balanced() -> None:
    sampler = build("progressively_balanced")
    # Epoch 0 is instance-balanced exactly; the last epoch (t = T-1) is within 1/T of class-balanced.
    np.testing.assert_allclose(sampler.class_probabilities(0), COUNTS / N, rtol=1e-12)
    last = sampler.class_probabilities(EPOCHS - 1)
    expected_last = (1 / EPOCHS) * COUNTS / N + (1 - 1 / EPOCHS) * 0.25
    np.testing.assert_allclose(last, expected_last, rtol=1e-12)
    np.testing.assert_allclose(last, 0.25, atol=0.45 / EPOCHS)
    middle = sampler.class_probabilities(EPOCHS // 2)
    np.testing.assert_allclose(middle, 0.5 * COUNTS / N + 0.5 * 0.25, rtol=1e-12)
    # Empirically, over a few epochs at each end.
    np.testing.assert_allclose(empirical_class_frequencies(sampler, [0, 1]), COUNTS / N, atol=0.06)
    np.testing.assert_allclose(empirical_class_frequencies(sampler, [EPOCHS - 2, EPOCHS - 1]), 0.25, atol=0.06)


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_stream_is_a_pure_function_of_seed_and_epoch(name: str) -> None:
    sampler = build(name)
    first = sampler.indices(3)
    assert first.dtype == np.int64
    assert len(first) == len(sampler) == sampler.num_samples
    # Asking again, out of order, or from a fresh object (a resumed run) gives the same stream.
    sampler.indices(5)
    assert np.array_equal(sampler.indices(3), first)
    assert np.array_equal(build(name).indices(3), first)
    assert not np.array_equal(sampler.indices(4), first)
    assert not np.array_equal(build(name, seed=8).indices(3), first)
    assert not np.array_equal(build(name, {"seed": 99}).indices(3), first)
    # params.seed wins over the run's seed.
    assert np.array_equal(build(name, {"seed": 99}, seed=1).indices(3), build(name, {"seed": 99}, seed=2).indices(3))
    assert ((first >= 0) & (first < N)).all()


@pytest.mark.parametrize("name", ONLINE)
def test_online_samplers_draw_as_many_samples_as_the_train_split(name: str) -> None:
    assert len(build(name)) == N


# ---------------------------------------------------------------------------------------------
# Offline over/undersampling really changes the class counts.


def selected_counts(sampler, epoch: int = 0) -> np.ndarray:
    return np.bincount(TARGETS[sampler.indices(epoch)], minlength=4)


def test_oversample_repeats_every_class_up_to_the_largest() -> None:
    sampler = build("oversample")
    assert selected_counts(sampler).tolist() == [500, 500, 500, 500]
    assert len(sampler) == 2000
    # The tail class of 10 reaches 500 with exactly 50 copies of each of its samples.
    drawn = sampler.indices(0)
    assert all(np.count_nonzero(drawn == i) == 50 for i in np.flatnonzero(TARGETS == 3))
    # Class 1 (200 -> 500): two full copies plus 100 distinct extra samples.
    repeats = np.bincount(drawn[TARGETS[drawn] == 1], minlength=N)[TARGETS == 1]
    assert sorted(set(repeats.tolist())) == [2, 3] and np.count_nonzero(repeats == 3) == 100


def test_oversample_ratio_sets_the_floor_and_never_drops_samples() -> None:
    sampler = build("oversample", {"ratio": 0.5})
    assert selected_counts(sampler).tolist() == [500, 250, 250, 250]
    np.testing.assert_allclose(sampler.class_probabilities(0), [0.4, 0.2, 0.2, 0.2])


def test_undersample_keeps_a_fixed_subset_per_class() -> None:
    sampler = build("undersample")
    drawn = sampler.indices(0)
    assert selected_counts(sampler).tolist() == [10, 10, 10, 10]
    assert len(np.unique(drawn)) == len(drawn) == 40  # drops, never repeats
    assert selected_counts(build("undersample", {"max_ratio": 2.0})).tolist() == [20, 20, 20, 10]
    assert selected_counts(build("undersample", {"max_ratio": 1000.0})).tolist() == COUNTS.tolist()


@pytest.mark.parametrize(("name", "params"), [("oversample", {}), ("undersample", {"max_ratio": 3.0})])
def test_offline_selection_is_fixed_for_the_run_and_reshuffled_each_epoch(name: str, params: dict) -> None:
    sampler = build(name, params)
    assert np.array_equal(np.sort(sampler.indices(0)), np.sort(sampler.indices(7)))
    assert not np.array_equal(sampler.indices(0), sampler.indices(7))
    # The selection itself is a function of the seed.
    assert not np.array_equal(np.sort(build(name, params, seed=8).indices(0)), np.sort(sampler.indices(0)))


def test_classes_without_samples_are_never_drawn() -> None:
    targets = [0, 0, 0, 0, 0, 2, 2, 2]
    ctx = BuildContext.from_targets(targets, 3, epochs=4)
    for name in ["class_balanced", "progressively_balanced", "effective_number", "reversed", "oversample"]:
        sampler = ibcore.build("sampler", name, {}, context=ctx)
        assert sampler.class_probabilities(2)[1] == 0.0
        assert 1 not in set(np.asarray(targets)[sampler.indices(0)].tolist())
    assert ibcore.build("sampler", "undersample", {}, context=ctx).indices(0).size == 6  # 3 + 3


def test_targets_may_be_a_tensor_or_an_array() -> None:
    torch = pytest.importorskip("torch")
    ctx = context(targets=torch.as_tensor(TARGETS))
    assert np.array_equal(ibcore.build("sampler", "reversed", {}, context=ctx).indices(2), build("reversed").indices(2))


# ---------------------------------------------------------------------------------------------
# Errors a user can cause.


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_missing_targets_error_names_the_sampler(name: str) -> None:
    with pytest.raises(ContextError, match=f"sampler '{name}'.*targets"):
        ibcore.build("sampler", name, {}, context=BuildContext(num_classes=4, epochs=3))


def test_progressive_sampler_needs_the_number_of_epochs() -> None:
    with pytest.raises(ContextError, match="sampler 'progressively_balanced'.*epochs"):
        build("progressively_balanced", epochs=None)


def test_labels_out_of_range_are_a_data_error_naming_the_position() -> None:
    with pytest.raises(DataError, match=r"targets\[2\] = 5 is outside \[0, 4\)"):
        ibcore.build("sampler", "class_balanced", {}, context=BuildContext(num_classes=4, targets=[0, 1, 5, 2]))


def test_class_counts_that_disagree_with_targets_are_rejected() -> None:
    with pytest.raises(ContextError, match="class_counts"):
        build("reversed", class_counts=(10, 10, 10, 10))


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("class_balanced", {"q": -0.5}, "q"),
        ("effective_number", {"beta": 1.0}, "beta"),
        ("oversample", {"ratio": 0.0}, "ratio"),
        ("undersample", {"max_ratio": 0.5}, "max_ratio"),
        ("instance", {"shuffle": True}, "shuffle"),
    ],
)
def test_invalid_params_are_rejected_with_their_path(name: str, params: dict, field: str) -> None:
    with pytest.raises(ibcore.ConfigError) as info:
        ibcore.validate_params("sampler", name, params)
    assert any(field in issue.path for issue in info.value.issues)


def test_importing_the_sampler_plugin_does_not_import_numpy() -> None:
    code = "import sys, ib_plugins_builtin.samplers; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Sharding one stream between distributed ranks.


@pytest.mark.parametrize(("length", "world"), [(10, 1), (10, 2), (10, 3), (11, 4), (3, 8), (0, 2)])
def test_shards_are_disjoint_equal_and_cover_the_stream(length: int, world: int) -> None:
    stream = np.arange(100, 100 + length, dtype=np.int64)
    shards = [shard(stream, rank, world) for rank in range(world)]
    per_rank = -(-length // world)
    assert all(len(s) == per_rank for s in shards)
    # Interleaving the shards back (rank r holds positions r, r+w, ...) gives the stream, then the
    # wrap-around padding taken from its start.
    padded = np.empty(per_rank * world, dtype=np.int64)
    for rank, part in enumerate(shards):
        padded[rank::world] = part
    assert np.array_equal(padded[:length], stream)
    if length:
        assert np.array_equal(padded[length:], np.resize(stream, len(padded) - length))
    assert set(np.concatenate(shards).tolist()) == set(stream.tolist())


def test_sharded_sampler_splits_a_samplers_epoch() -> None:
    sampler = build("class_balanced")
    ranks = [ShardedSampler(sampler, rank, 3) for rank in range(3)]
    assert all(len(r) == r.num_samples == -(-N // 3) for r in ranks)
    stream = sampler.indices(4)
    parts = [r.indices(4) for r in ranks]
    padded = np.empty(sum(len(p) for p in parts), dtype=np.int64)
    for rank, part in enumerate(parts):
        padded[rank::3] = part
    assert np.array_equal(padded[:N], stream)


@pytest.mark.parametrize(("rank", "world"), [(-1, 2), (2, 2), (0, 0)])
def test_shard_rejects_a_rank_outside_the_world(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="rank must be in|world_size must be"):
        shard(np.arange(4), rank, world)
    with pytest.raises(ValueError):
        ShardedSampler(build("instance"), rank, world)
