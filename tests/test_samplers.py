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
CLASS_AWARE = {"mechanics": "class_aware"}
# Every sampler, and every option that changes how a stream is drawn.
ALL_STREAMS = [
    *((name, {}) for name in ALL_SAMPLERS),
    ("class_balanced", CLASS_AWARE),
    ("class_balanced", {**CLASS_AWARE, "num_samples_cls": 4}),
    ("class_balanced", {**CLASS_AWARE, "epoch_length": "train_split"}),
    ("progressively_balanced", {"schedule": "bagoftricks"}),
]


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


# ---------------------------------------------------------------------------------------------
# Progressively-balanced sampling: p_c(t) = (1 - λ_t)·n_c/N + λ_t/C.
#
# schedule "kang" follows facebookresearch/classifier-balancing (commit f162adef63fdf592d0b8a0f6e52bc481fc08785f),
# data/ClassPrioritySampler.py with the settings of config/ImageNet_LT/feat_shift.yaml (lam: null, cycle: 0,
# manual_only: true, nroot: null): lams = np.linspace(0, 1, epochs); run_networks.py trains epochs 1..T and calls
# reset_weights(epoch) after each, which selects lams[clip(epoch, 0, T-1)] for the next one. So 0-based epoch t
# draws with λ_t = min(t, T-1)/(T-1) (λ = 0 throughout when T = 1). The tables below are the normalised weights of
# its priority tree (ptree.get_total_weights()) before each epoch, printed by running that file.
OFFICIAL_KANG_9_1_T2 = [[0.9, 0.1], [0.5, 0.5], [0.5, 0.5]]
OFFICIAL_KANG_9_1_T5 = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.5, 0.5]]
OFFICIAL_KANG_9_1_T1 = [[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]
OFFICIAL_KANG_COUNTS_T20 = [  # COUNTS = [500, 200, 50, 10], epochs = 20, t = 0 .. 21
    [0.6578947368421053, 0.2631578947368421, 0.06578947368421052, 0.013157894736842105],
    [0.6364265927977839, 0.26246537396121883, 0.07548476454293629, 0.025623268698060937],
    [0.6149584487534626, 0.2617728531855956, 0.08518005540166204, 0.03808864265927978],
    [0.5934903047091412, 0.26108033240997225, 0.09487534626038781, 0.050554016620498604],
    [0.5720221606648199, 0.26038781163434904, 0.10457063711911356, 0.06301939058171743],
    [0.5505540166204986, 0.2596952908587258, 0.11426592797783931, 0.07548476454293629],
    [0.5290858725761772, 0.25900277008310246, 0.12396121883656509, 0.08795013850415512],
    [0.5076177285318559, 0.25831024930747926, 0.13365650969529086, 0.10041551246537395],
    [0.4861495844875346, 0.257617728531856, 0.14335180055401664, 0.11288088642659279],
    [0.4646814404432132, 0.2569252077562327, 0.15304709141274236, 0.1253462603878116],
    [0.44321329639889195, 0.2562326869806094, 0.16274238227146812, 0.13781163434903046],
    [0.4217451523545706, 0.2555401662049862, 0.17243767313019392, 0.15027700831024932],
    [0.4002770083102493, 0.2548476454293629, 0.18213296398891965, 0.16274238227146814],
    [0.37880886426592797, 0.2541551246537396, 0.19182825484764535, 0.17520775623268692],
    [0.3573407202216066, 0.2534626038781164, 0.20152354570637124, 0.1876731301939058],
    [0.33587257617728533, 0.2527700831024931, 0.21121883656509696, 0.20013850415512469],
    [0.31440443213296404, 0.2520775623268698, 0.2209141274238227, 0.21260387811634346],
    [0.2929362880886427, 0.2513850415512465, 0.23060941828254847, 0.22506925207756232],
    [0.2714681440443214, 0.25069252077562326, 0.24030470914127422, 0.23753462603878114],
    [0.25, 0.25, 0.25, 0.25],
    [0.25, 0.25, 0.25, 0.25],
    [0.25, 0.25, 0.25, 0.25],
]


def bagoftricks_probabilities(counts: list[int], epochs: int, t: int) -> np.ndarray:
    """zhangyongshun/BagofTricks-LT (commit ce7859a930649d10fb2a4fd4ed9242007eb25e2f), lib/dataset/cao_cifar.py,
    IMBALANCECIFAR10.update(epoch) with main/train.py's 1-based epochs: progress_p = epoch/MAX_EPOCH * class_p +
    (1 - epoch/MAX_EPOCH) * instance_p, so 0-based epoch t uses (t+1)/T."""
    epoch = t + 1
    instance = np.asarray(counts) / sum(counts)
    return epoch / epochs * np.full(len(counts), 1 / len(counts)) + (1 - epoch / epochs) * instance


def two_classes(epochs: int, **params: object):
    ctx = BuildContext.from_targets([0] * 9 + [1], 2, epochs=epochs, seed=0)
    return ibcore.build("sampler", "progressively_balanced", params, context=ctx)


def test_progressive_two_classes_is_instance_balanced_first_and_class_balanced_in_the_last_epoch() -> None:
    sampler = two_classes(2)
    np.testing.assert_allclose(sampler.class_probabilities(0), [0.9, 0.1], rtol=1e-12)
    np.testing.assert_allclose(sampler.class_probabilities(1), [0.5, 0.5], rtol=1e-12)
    # What each epoch really draws: 10 indices an epoch, over 300 seeds.
    drawn = {
        epoch: np.concatenate([two_classes(2, seed=seed).indices(epoch) for seed in range(300)]) for epoch in (0, 1)
    }
    np.testing.assert_allclose(np.mean(drawn[0] == 9), 0.1, atol=0.03)
    np.testing.assert_allclose(np.mean(drawn[1] == 9), 0.5, atol=0.05)


@pytest.mark.parametrize(
    ("epochs", "official"), [(2, OFFICIAL_KANG_9_1_T2), (5, OFFICIAL_KANG_9_1_T5), (1, OFFICIAL_KANG_9_1_T1)]
)
def test_progressive_kang_schedule_matches_the_official_code_on_two_classes(epochs: int, official: list) -> None:
    sampler = two_classes(epochs)
    for t, expected in enumerate(official):
        np.testing.assert_allclose(sampler.class_probabilities(t), expected, rtol=1e-12, err_msg=f"epoch {t}")


def test_progressive_kang_schedule_matches_the_official_code() -> None:
    sampler = build("progressively_balanced")
    assert sampler.schedule == "kang"
    for t, expected in enumerate(OFFICIAL_KANG_COUNTS_T20):
        np.testing.assert_allclose(sampler.class_probabilities(t), expected, rtol=1e-12, err_msg=f"epoch {t}")
    # Empirically, over a few epochs at each end (760 draws an epoch).
    np.testing.assert_allclose(empirical_class_frequencies(sampler, [0, 1]), COUNTS / N, atol=0.04)
    np.testing.assert_allclose(empirical_class_frequencies(sampler, [EPOCHS - 2, EPOCHS - 1]), 0.25, atol=0.04)


def test_progressive_bagoftricks_schedule_matches_its_official_rule() -> None:
    sampler = build("progressively_balanced", {"schedule": "bagoftricks"})
    for t in range(EPOCHS):
        expected = bagoftricks_probabilities(COUNTS.tolist(), EPOCHS, t)
        np.testing.assert_allclose(sampler.class_probabilities(t), expected, rtol=1e-12, err_msg=f"epoch {t}")
    np.testing.assert_allclose(sampler.class_probabilities(EPOCHS - 1), 0.25, rtol=1e-12)
    np.testing.assert_allclose(sampler.class_probabilities(EPOCHS + 5), 0.25, rtol=1e-12)  # a later stage
    # The 2-class example: already 1/T of the way at epoch 0.
    np.testing.assert_allclose(two_classes(2, schedule="bagoftricks").class_probabilities(0), [0.7, 0.3], rtol=1e-12)
    np.testing.assert_allclose(two_classes(2, schedule="bagoftricks").class_probabilities(1), [0.5, 0.5], rtol=1e-12)


def test_progressive_kang_draws_each_class_through_its_random_cycle_across_epochs() -> None:
    # The official ClassPrioritySampler picks the class from the priority tree, then the next sample of that
    # class's RandomCycleIter, which lives for the whole run: a class's samples are all drawn once before any
    # is drawn again, and the cycle carries on from one epoch to the next.
    sampler = build("progressively_balanced")
    drawn = np.concatenate([sampler.indices(e) for e in range(EPOCHS)])
    for cls, n in enumerate(COUNTS):
        mine = drawn[TARGETS[drawn] == cls]
        whole = len(mine) // n * n
        assert whole >= n
        cycles = np.sort(mine[:whole].reshape(-1, n), axis=1)
        assert (cycles == np.sort(np.flatnonzero(TARGETS == cls))).all()
    # BagofTricks-LT draws within the class uniformly with replacement (random.choice): repeats come sooner.
    uniform = build("progressively_balanced", {"schedule": "bagoftricks"})
    tail = np.concatenate([uniform.indices(e) for e in range(EPOCHS)])
    tail = tail[TARGETS[tail] == 3]
    assert any(len(np.unique(tail[i : i + 10])) < 10 for i in range(0, len(tail) - 9, 10))


def test_progressive_kang_epochs_can_be_asked_for_in_any_order() -> None:
    # Where each class's cycle stands depends on the earlier epochs' draws; a fresh sampler (a resumed run, a rank
    # that joins late) recounts them and gets the same stream.
    sequential = build("progressively_balanced")
    streams = [sequential.indices(e) for e in range(8)]
    assert np.array_equal(build("progressively_balanced").indices(7), streams[7])
    backwards = build("progressively_balanced")
    assert all(np.array_equal(backwards.indices(e), streams[e]) for e in reversed(range(8)))


@pytest.mark.parametrize(("name", "params"), ALL_STREAMS)
def test_stream_is_a_pure_function_of_seed_and_epoch(name: str, params: dict) -> None:
    sampler = build(name, params)
    first = sampler.indices(3)
    assert first.dtype == np.int64
    assert len(first) == len(sampler) == sampler.num_samples
    # Asking again, out of order, or from a fresh object (a resumed run) gives the same stream.
    sampler.indices(5)
    assert np.array_equal(sampler.indices(3), first)
    assert np.array_equal(build(name, params).indices(3), first)
    assert not np.array_equal(sampler.indices(4), first)
    assert not np.array_equal(build(name, params, seed=8).indices(3), first)
    assert not np.array_equal(build(name, {**params, "seed": 99}).indices(3), first)
    # params.seed wins over the run's seed.
    seeded = {**params, "seed": 99}
    assert np.array_equal(build(name, seeded, seed=1).indices(3), build(name, seeded, seed=2).indices(3))
    assert ((first >= 0) & (first < N)).all()
    with pytest.raises(ValueError, match="epoch must be non-negative"):
        sampler.indices(-1)


@pytest.mark.parametrize("name", ONLINE)
def test_online_samplers_draw_as_many_samples_as_the_train_split(name: str) -> None:
    assert len(build(name)) == N


# ---------------------------------------------------------------------------------------------
# class_balanced with mechanics "class_aware": the official ClassAwareSampler of Kang et al.
# (facebookresearch/classifier-balancing, commit f162adef63fdf592d0b8a0f6e52bc481fc08785f, data/ClassAwareSampler.py):
# a RandomCycleIter over the classes and one over each class's samples (each reshuffled when exhausted, the first
# pass shuffled too), num_samples_cls consecutive samples of a class per class visit, n_max · C draws per epoch,
# and the iterators kept from one epoch to the next.
#
# Measured on the official sampler with COUNTS above, random.seed(0), 40 epochs (num_samples_cls 1): the gap between
# two visits of the same class (1 .. 2C-1) has frequencies
OFFICIAL_CLASS_VISIT_GAPS = [0.0626, 0.1254, 0.1896, 0.2459, 0.1869, 0.1274, 0.0622]
# (the triangle (C - |d - C|) / C^2 of two independent shuffles), and in epoch 0 half of class 1's 200 samples are
# drawn twice and half three times; over epochs 0 and 1 every one exactly five times (num_samples_cls 1 and 4 alike).


def class_aware(params: dict | None = None, **changes: object):
    return build("class_balanced", {**CLASS_AWARE, **(params or {})}, **changes)


@pytest.mark.parametrize("per_visit", [1, 4])
def test_class_aware_epoch_has_n_max_times_classes_draws_and_every_class_equally_often(per_visit: int) -> None:
    sampler = class_aware({"num_samples_cls": per_visit})
    assert len(sampler) == sampler.num_samples == 500 * 4
    for epoch in range(3):
        assert selected_counts(sampler, epoch).tolist() == [500, 500, 500, 500]
    np.testing.assert_allclose(sampler.class_probabilities(0), 0.25)


def test_class_aware_epoch_length_can_be_the_train_split() -> None:
    sampler = class_aware({"epoch_length": "train_split"})
    assert len(sampler) == N
    # 760 draws = 190 whole class cycles: still exactly balanced.
    assert selected_counts(sampler, 0).tolist() == [190, 190, 190, 190]
    # The independent mechanics take the official sampler's length too.
    assert len(build("class_balanced", {"epoch_length": "n_max_per_class"})) == 2000


@pytest.mark.parametrize("per_visit", [1, 4])
def test_class_aware_visits_classes_in_reshuffled_cycles(per_visit: int) -> None:
    sampler = class_aware({"num_samples_cls": per_visit})
    labels = np.concatenate([TARGETS[sampler.indices(e)] for e in range(20)])
    visits = labels.reshape(-1, per_visit)
    assert (visits == visits[:, :1]).all()  # num_samples_cls consecutive draws from one class
    cycles = visits[:, 0].reshape(-1, 4)
    assert (np.sort(cycles, axis=1) == np.arange(4)).all()  # every C visits: each class once ...
    assert len({tuple(c) for c in cycles.tolist()}) > 12  # ... in a fresh order (24 possible)
    gaps = np.concatenate([np.diff(np.flatnonzero(visits[:, 0] == c)) for c in range(4)])
    frequencies = np.bincount(gaps, minlength=8)[1:] / len(gaps)
    np.testing.assert_allclose(frequencies, OFFICIAL_CLASS_VISIT_GAPS, atol=0.015)


@pytest.mark.parametrize("per_visit", [1, 4])
def test_class_aware_draws_a_class_without_replacement_before_repeating(per_visit: int) -> None:
    sampler = class_aware({"num_samples_cls": per_visit})
    drawn = np.concatenate([sampler.indices(e) for e in range(3)])  # the cycles run on across epochs
    for cls, n in enumerate(COUNTS):
        mine = drawn[TARGETS[drawn] == cls]
        whole = len(mine) // n * n
        assert (np.sort(mine[:whole].reshape(-1, n), axis=1) == np.sort(np.flatnonzero(TARGETS == cls))).all()
        assert len({tuple(c) for c in mine[: min(whole, 5 * n)].reshape(-1, n).tolist()}) > 1  # reshuffled
    # The official sampler's per-sample counts for class 1 (200 samples, 500 draws an epoch).
    first = sampler.indices(0)
    repeats = np.bincount(first[TARGETS[first] == 1], minlength=N)[TARGETS == 1]
    assert np.bincount(repeats).tolist() == [0, 0, 100, 100]
    both = np.concatenate([first, sampler.indices(1)])
    assert (np.bincount(both[TARGETS[both] == 1], minlength=N)[TARGETS == 1] == 5).all()


def test_class_aware_visits_run_on_across_epochs() -> None:
    # Counts 5, 3, 2 and 4 samples a visit: 15 draws an epoch are 4 visits, the last one cut short. As in the
    # official generator, the next epoch starts a new visit, and the class cycle goes on where it stood.
    targets = np.repeat(np.arange(3), [5, 3, 2])
    ctx = BuildContext.from_targets(targets.tolist(), 3, epochs=4, seed=3)
    sampler = ibcore.build("sampler", "class_balanced", {**CLASS_AWARE, "num_samples_cls": 4}, context=ctx)
    assert len(sampler) == 15
    visits = []
    for epoch in range(6):
        labels = targets[sampler.indices(epoch)]
        assert [len(set(labels[i : i + 4])) for i in range(0, 15, 4)] == [1, 1, 1, 1]
        visits += labels[::4].tolist()
    cycles = np.asarray(visits).reshape(-1, 3)  # 24 visits = 8 class cycles, straddling the epoch boundaries
    assert (np.sort(cycles, axis=1) == np.arange(3)).all()


def test_class_aware_options_are_checked() -> None:
    with pytest.raises(ibcore.ConfigError, match="class_aware.*q = 0"):
        ibcore.validate_params("sampler", "class_balanced", {"mechanics": "class_aware", "q": 0.5})
    with pytest.raises(ibcore.ConfigError, match="num_samples_cls is only used with mechanics 'class_aware'"):
        ibcore.validate_params("sampler", "class_balanced", {"num_samples_cls": 4})
    with pytest.raises(ibcore.ConfigError) as info:
        ibcore.validate_params("sampler", "class_balanced", {"mechanics": "relay"})
    assert any("mechanics" in issue.path for issue in info.value.issues)
    # The defaults of the official sampler.
    params = ibcore.validate_params("sampler", "class_balanced", CLASS_AWARE)
    assert params.num_samples_cls == 1 and params.epoch_length is None


def test_class_aware_skips_classes_without_samples() -> None:
    targets = [0, 0, 0, 0, 0, 2, 2, 2]
    ctx = BuildContext.from_targets(targets, 3, epochs=4)
    sampler = ibcore.build("sampler", "class_balanced", CLASS_AWARE, context=ctx)
    assert len(sampler) == 5 * 2  # n_max times the classes that have samples
    np.testing.assert_allclose(sampler.class_probabilities(0), [0.5, 0.0, 0.5])
    assert np.bincount(np.asarray(targets)[sampler.indices(0)], minlength=3).tolist() == [5, 0, 5]


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
    for name, params in [*((n, {}) for n in ONLINE), ("oversample", {}), ("class_balanced", CLASS_AWARE)]:
        sampler = ibcore.build("sampler", name, params, context=ctx)
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


@pytest.mark.parametrize(("name", "params"), [("class_balanced", {}), ("class_balanced", CLASS_AWARE)])
def test_sharded_sampler_splits_a_samplers_epoch(name: str, params: dict) -> None:
    sampler = build(name, params)
    n = len(sampler)
    ranks = [ShardedSampler(sampler, rank, 3) for rank in range(3)]
    assert all(len(r) == r.num_samples == -(-n // 3) for r in ranks)
    stream = sampler.indices(4)
    # Every rank builds its own sampler (another process): the slices still fit together.
    parts = [ShardedSampler(build(name, params), rank, 3).indices(4) for rank in range(3)]
    padded = np.empty(sum(len(p) for p in parts), dtype=np.int64)
    for rank, part in enumerate(parts):
        padded[rank::3] = part
    assert np.array_equal(padded[:n], stream)


@pytest.mark.parametrize(("rank", "world"), [(-1, 2), (2, 2), (0, 0)])
def test_shard_rejects_a_rank_outside_the_world(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="rank must be in|world_size must be"):
        shard(np.arange(4), rank, world)
    with pytest.raises(ValueError):
        ShardedSampler(build("instance"), rank, world)
