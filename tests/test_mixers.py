"""Built-in mixers: one lambda and one pairing per batch, shared by inputs and labels; reproducible plans."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ibcore
from ibcore import BuildContext, ConfigError, ContextError, DataError

MIXERS = ["input_mixup", "manifold_mixup", "cutmix", "remix"]
COUNTS = (300, 100, 10)  # train class counts for Remix


def build(name: str, params: dict | None = None, **context: object):
    base = {"num_classes": 3, "class_counts": COUNTS, "epochs": 10}
    base.update(context)
    return ibcore.build("mixer", name, params or {}, context=BuildContext(**base))  # type: ignore[arg-type]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 1, 6, 6, generator=generator(123))
    y = torch.tensor([0, 1, 2, 0, 1, 0, 0, 2][:n])
    return x, y


# ---------------------------------------------------------------------------------------------
# Reproducibility


@pytest.mark.parametrize("name", MIXERS)
def test_same_generator_seed_gives_the_same_plan(name):
    mixer = build(name)
    x, y = batch()
    first, second = mixer.plan(x, y, generator(7)), mixer.plan(x, y, generator(7))
    assert torch.equal(first.permutation, second.permutation)
    assert first.lam == second.lam and first.layer == second.layer and first.box == second.box
    assert torch.equal(first.target_weight, second.target_weight)
    others = [mixer.plan(x, y, generator(seed)) for seed in range(8, 12)]
    assert any(plan.lam != first.lam for plan in others)


@pytest.mark.parametrize("name", MIXERS)
def test_plans_draw_only_from_the_given_generator(name):
    mixer = build(name)
    x, y = batch()
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    rng = generator(3)
    before = rng.get_state()
    mixer.plan(x, y, rng)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert not torch.equal(rng.get_state(), before)  # consecutive batches get different plans


def test_lambda_follows_beta_alpha_alpha():
    mixer = build("input_mixup", {"alpha": 1.0})  # Beta(1, 1) is uniform on [0, 1]
    x, y = batch()
    rng = generator(0)
    lams = np.array([mixer.plan(x, y, rng).lam for _ in range(1000)])
    assert 0.0 < lams.min() and lams.max() < 1.0
    assert abs(lams.mean() - 0.5) < 0.03 and abs((lams < 0.25).mean() - 0.25) < 0.04


# ---------------------------------------------------------------------------------------------
# One lambda, one pairing


@pytest.mark.parametrize("name", ["input_mixup", "manifold_mixup"])
def test_inputs_and_targets_share_lambda_and_pairing(name):
    mixer = build(name)
    x, y = batch()
    plan = mixer.plan(x, y, generator(1))
    assert sorted(plan.permutation.tolist()) == list(range(8))
    assert torch.equal(mixer.mix(x, plan), plan.lam * x + (1 - plan.lam) * x[plan.permutation])
    assert torch.equal(plan.target_weight, torch.full((8,), plan.lam))


def test_remix_mixes_inputs_like_mixup():
    mixer = build("remix")
    x, y = batch()
    plan = mixer.plan(x, y, generator(2))
    assert torch.equal(mixer.mix(x, plan), plan.lam * x + (1 - plan.lam) * x[plan.permutation])
    torch.testing.assert_close(plan.target_weight, mixer.label_weights(y, plan.permutation, plan.lam))


def test_trainer_loss_recovers_mixup_cross_entropy():
    # loss(z, y, w) + loss(z, y[perm], 1 - w) with w = lam is the cross-entropy against lam*y + (1-lam)*y[perm].
    mixer = build("input_mixup")
    x, y = batch()
    plan = mixer.plan(x, y, generator(4))
    logits = torch.randn(8, 3, generator=generator(5))
    w = plan.target_weight
    ours = (F.cross_entropy(logits, y, reduction="none") * w).mean() + (
        F.cross_entropy(logits, y[plan.permutation], reduction="none") * (1 - w)
    ).mean()
    soft = plan.lam * F.one_hot(y, 3) + (1 - plan.lam) * F.one_hot(y[plan.permutation], 3)
    torch.testing.assert_close(ours, -(soft * logits.log_softmax(1)).sum(1).mean())


# ---------------------------------------------------------------------------------------------
# CutMix


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lambda_is_the_kept_area(seed):
    mixer = build("cutmix")
    x, y = batch()
    original = x.clone()
    plan = mixer.plan(x, y, generator(seed))
    top, bottom, left, right = plan.box
    assert 0 <= top <= bottom <= 6 and 0 <= left <= right <= 6
    assert plan.lam == pytest.approx(1 - (bottom - top) * (right - left) / 36)
    assert torch.equal(plan.target_weight, torch.full((8,), plan.lam))
    mixed = mixer.mix(x, plan)
    from_partner = torch.zeros(6, 6, dtype=torch.bool)
    from_partner[top:bottom, left:right] = True
    assert torch.equal(mixed[:, :, from_partner], x[plan.permutation][:, :, from_partner])
    assert torch.equal(mixed[:, :, ~from_partner], x[:, :, ~from_partner])
    assert (~from_partner).float().mean().item() == pytest.approx(plan.lam)  # own-pixel share = label weight
    assert torch.equal(x, original)  # the input batch itself is not modified in place


def test_cutmix_needs_image_batches():
    mixer = build("cutmix")
    with pytest.raises(DataError, match="image batches"):
        mixer.plan(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), generator(0))


# ---------------------------------------------------------------------------------------------
# Remix label rule


def test_remix_label_rule_on_hand_made_counts():
    # Chou et al. 2020, Eq. for lambda_y (kappa=3, tau=0.5), class counts (300, 100, 10):
    # pairs (i, partner): (0,1) n_i/n_j = 3 >= kappa; (1,0) = 1/3 <= 1/kappa; (2,0) = 1/30; (0,2) = 30.
    mixer = build("remix", {"kappa": 3.0, "tau": 0.5})
    targets = torch.tensor([0, 1, 2, 0])
    partner = torch.tensor([1, 0, 3, 2])
    # lam < tau: a majority sample that is mostly its minority partner gives its label away (0).
    assert mixer.label_weights(targets, partner, 0.3).tolist() == pytest.approx([0.0, 0.3, 0.3, 0.0])
    # 1 - lam < tau: a minority sample that dominates keeps its whole label (1).
    assert mixer.label_weights(targets, partner, 0.8).tolist() == pytest.approx([0.8, 1.0, 1.0, 0.8])
    # neither condition: plain mixup weights.
    assert mixer.label_weights(targets, partner, 0.5).tolist() == pytest.approx([0.5] * 4)


def test_remix_counts_a_pair_as_imbalanced_only_from_kappa_on():
    mixer = ibcore.build("mixer", "remix", {"kappa": 3.0}, context=BuildContext(class_counts=(299, 100)))
    targets, partner = torch.tensor([0, 1]), torch.tensor([1, 0])
    # 299/100 < 3: no relabelling in either direction.
    assert mixer.label_weights(targets, partner, 0.2).tolist() == pytest.approx([0.2, 0.2])
    assert mixer.label_weights(targets, partner, 0.9).tolist() == pytest.approx([0.9, 0.9])


def test_remix_needs_class_counts():
    with pytest.raises(ContextError, match="class_counts"):
        ibcore.build("mixer", "remix", {}, context=BuildContext(num_classes=3))


# ---------------------------------------------------------------------------------------------
# Schedule and probability


def test_disable_last_epochs_switches_mixing_off_at_the_end():
    mixer = build("input_mixup", {"disable_last_epochs": 2}, epochs=10)
    assert [mixer.active(epoch) for epoch in range(10)] == [True] * 8 + [False] * 2
    assert all(build("cutmix", epochs=None).active(epoch) for epoch in range(1000))


def test_disable_last_epochs_needs_epochs_and_fits_the_run():
    with pytest.raises(ContextError, match="epochs"):
        build("remix", {"disable_last_epochs": 3}, epochs=None)
    with pytest.raises(ConfigError, match="disable_last_epochs"):
        build("input_mixup", {"disable_last_epochs": 11}, epochs=10)


@pytest.mark.parametrize("name", MIXERS)
def test_prob_zero_gives_identity_plans(name):
    mixer = build(name, {"prob": 0.0})
    x, y = batch()
    plan = mixer.plan(x, y, generator(0))
    assert torch.equal(plan.permutation, torch.arange(8))
    assert plan.lam == 1.0 and plan.layer == 0
    assert torch.equal(plan.target_weight, torch.ones(8))
    assert torch.equal(mixer.mix(x, plan), x)


def test_prob_mixes_that_fraction_of_batches():
    mixer = build("input_mixup", {"prob": 0.3})
    x, y = batch()
    rng = generator(0)
    mixed = [mixer.plan(x, y, rng).lam != 1.0 for _ in range(1000)]
    assert abs(np.mean(mixed) - 0.3) < 0.05


@pytest.mark.parametrize(("params", "field"), [({"alpha": 0}, "alpha"), ({"prob": 1.5}, "prob"), ({"tau": 2}, "tau")])
def test_out_of_range_params_are_rejected(params, field):
    with pytest.raises(ConfigError, match=f"params.{field}"):
        build("remix", params)


# ---------------------------------------------------------------------------------------------
# Manifold mixup with a real backbone


def test_manifold_mixup_draws_its_layer_from_the_allowed_set():
    mixer = build("manifold_mixup", {"layers": [1, 2]})
    x, y = batch()
    rng = generator(0)
    layers = {mixer.plan(x, y, rng).layer for _ in range(50)}
    assert layers == {1, 2}
    assert mixer.mixes_hidden and not build("input_mixup").mixes_hidden


def test_manifold_mixup_through_small_cnn_mixes_hidden_activations():
    torch.manual_seed(0)
    backbone = ibcore.build("backbone", "small_cnn", {"width": 4}, context=BuildContext(num_classes=3)).eval()
    mixer = build("manifold_mixup", {"layers": [1]}, backbone=backbone)
    x, y = batch()
    plan = mixer.plan(x, y, generator(9))
    assert plan.layer == 1
    logits = backbone.forward_mixed(x, plan.layer, lambda h: mixer.mix(h, plan))
    with torch.no_grad():  # by hand: stage 1, mix with the plan's lambda and pairing, then the rest
        hidden = backbone.stages[0](x)
        hidden = plan.lam * hidden + (1 - plan.lam) * hidden[plan.permutation]
        expected = backbone.classifier(backbone.pool(backbone.stages[1](hidden)))
    torch.testing.assert_close(logits, expected)
    loss = (F.cross_entropy(logits, y, reduction="none") * plan.target_weight).mean() + (
        F.cross_entropy(logits, y[plan.permutation], reduction="none") * (1 - plan.target_weight)
    ).mean()
    loss.backward()
    assert backbone.stages[0][0].weight.grad is not None


def test_manifold_mixup_rejects_layers_the_backbone_lacks():
    backbone = ibcore.build("backbone", "small_cnn", {}, context=BuildContext(num_classes=3))
    with pytest.raises(ConfigError, match=r"params.layers"):
        build("manifold_mixup", {"layers": [0, 3]}, backbone=backbone)


def test_registering_the_mixers_imports_no_torch():
    # `ib list` and `ib validate` import the kind package; torch, torchvision and numpy stay unloaded.
    code = (
        "import sys, ibcore, ib_plugins_builtin.mixers; "
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
