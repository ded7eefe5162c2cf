"""Built-in optimizers: the published LR schedules epoch by epoch, param groups, and parity with torch.optim."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from itertools import pairwise

import pytest
import torch

import ibcore
from ibcore import BuildContext, ConfigError, ContextError, TrainingError

EPOCHS = 200


def recipe(name: str = "sgd", params: dict | None = None, **context: object):
    return ibcore.build("optimizer", name, params or {}, context=BuildContext(**context))


def per_epoch_lrs(optimizer, epochs: int = EPOCHS) -> list[float]:
    return [optimizer.lr_at(epoch, 0, 10) for epoch in range(epochs)]


def expected_multistep(warmup: list[float], base: float, after_160: float, after_180: float) -> list[float]:
    return warmup + [base] * (160 - len(warmup)) + [after_160] * 20 + [after_180] * 20


# The CIFAR-LT recipe of DESIGN.md §5 (LDAM-DRW / BagofTricks-LT): lr 0.1, 5 warm-up epochs,
# milestones [160, 180], gamma 0.01.
CIFAR_RECIPE = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 2e-4,
    "warmup_epochs": 5,
    "milestones": [160, 180],
    "gamma": 0.01,
}


def test_ldam_drw_schedule_with_the_default_warmup() -> None:
    # kaidic/LDAM-DRW cifar_train.py adjust_learning_rate: epoch+1 <= 5 -> lr·(epoch+1)/5; then lr;
    # lr·0.01 from (0-based) epoch 160; lr·0.0001 from epoch 180.
    lrs = per_epoch_lrs(recipe("sgd", CIFAR_RECIPE))
    assert lrs == pytest.approx(expected_multistep([0.02, 0.04, 0.06, 0.08, 0.1], 0.1, 1e-3, 1e-5), rel=1e-12)


def test_bag_of_tricks_schedule_with_a_warmup_start_factor_of_one_third() -> None:
    # BagofTricks-LT WarmupMultiStepLR (warmup_factor 1/3, WARM_EPOCH 5, LR_STEP [160, 180],
    # LR_FACTOR 0.01): lr·(1/3·(1 - e/5) + e/5) for e < 5, then multi-step.
    lrs = per_epoch_lrs(recipe("sgd", {**CIFAR_RECIPE, "warmup_start_factor": 1 / 3}))
    warmup = [0.1 / 3, 0.1 * 7 / 15, 0.06, 0.1 * 11 / 15, 0.1 * 13 / 15]  # 0.0333, 0.0467, 0.06, 0.0733, 0.0867
    assert lrs == pytest.approx(expected_multistep(warmup, 0.1, 1e-3, 1e-5), rel=1e-12)
    assert lrs[5] == 0.1


def test_imbalance_baselines_schedule_decays_by_ten() -> None:
    # The original imbalance-baselines recipe: 0.02 ... 0.1 warm-up, then ×0.1 at 160 and 180.
    lrs = per_epoch_lrs(recipe("sgd", {**CIFAR_RECIPE, "gamma": 0.1}))
    assert lrs == pytest.approx(expected_multistep([0.02, 0.04, 0.06, 0.08, 0.1], 0.1, 0.01, 0.001), rel=1e-12)


def test_lr_is_a_pure_function_of_the_step() -> None:
    optimizer = recipe("sgd", CIFAR_RECIPE)
    later = optimizer.lr_at(170, 3, 10)
    earlier = optimizer.lr_at(2, 0, 10)
    # Asked again in another order, or by a fresh recipe (a resumed run): the same numbers.
    assert recipe("sgd", CIFAR_RECIPE).lr_at(2, 0, 10) == earlier
    assert optimizer.lr_at(170, 3, 10) == later
    # Per-epoch warm-up ignores the iteration.
    assert optimizer.lr_at(2, 9, 10) == earlier


def test_per_iteration_warmup_in_both_conventions() -> None:
    iters = 10
    default_style = recipe("sgd", {"lr": 0.1, "warmup_epochs": 5, "warmup_per_iteration": True})
    assert default_style.lr_at(0, 0, iters) == pytest.approx(0.1 * 1 / 50)
    assert default_style.lr_at(2, 4, iters) == pytest.approx(0.1 * 25 / 50)
    assert default_style.lr_at(4, 9, iters) == pytest.approx(0.1)
    assert default_style.lr_at(5, 0, iters) == pytest.approx(0.1)
    from_a_third = recipe(
        "sgd", {"lr": 0.1, "warmup_epochs": 5, "warmup_start_factor": 1 / 3, "warmup_per_iteration": True}
    )
    assert from_a_third.lr_at(0, 0, iters) == pytest.approx(0.1 / 3)
    assert from_a_third.lr_at(2, 5, iters) == pytest.approx(0.1 * (1 / 3 + (2 / 3) * 2.5 / 5))
    lrs = [from_a_third.lr_at(e, i, iters) for e in range(6) for i in range(iters)]
    assert all(b > a for a, b in pairwise(lrs[:51]))  # rises every step, reaching 0.1 at epoch 5
    assert lrs[50] == pytest.approx(0.1)


def test_cosine_with_warmup_endpoints() -> None:
    optimizer = recipe("sgd", {"lr": 0.1, "schedule": "cosine", "warmup_epochs": 5, "min_lr": 0.001}, epochs=105)
    lrs = per_epoch_lrs(optimizer, 105)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == pytest.approx(0.1)  # the cosine starts at lr when warm-up ends
    assert lrs[55] == pytest.approx((0.1 + 0.001) / 2)  # half way through the 100 cosine epochs
    assert lrs[104] == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert optimizer.lr_at(105, 0, 10) == pytest.approx(0.001)  # min_lr is reached at epoch T
    assert all(b <= a for a, b in pairwise(lrs[5:]))


def test_cosine_needs_the_number_of_epochs() -> None:
    with pytest.raises(ContextError, match="optimizer 'sgd'.*epochs"):
        recipe("sgd", {"schedule": "cosine"})


def test_constant_schedule() -> None:
    lrs = per_epoch_lrs(recipe("adam", {"lr": 0.01, "schedule": "constant", "warmup_epochs": 2}), 50)
    assert lrs == pytest.approx([0.005, 0.01] + [0.01] * 48)


# ---------------------------------------------------------------------------------------------
# The torch optimizer.


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_recipe_follows_the_protocol_and_keeps_its_params() -> None:
    sgd = recipe("sgd", CIFAR_RECIPE)
    assert sgd.base_lr == 0.1
    assert sgd.params.milestones == [160, 180] and sgd.params.gamma == 0.01
    defaults = recipe("sgd").params
    assert (defaults.lr, defaults.momentum, defaults.weight_decay, defaults.nesterov) == (0.1, 0.9, 2e-4, False)
    assert isinstance(recipe("adam").create(tiny_model().named_parameters()), torch.optim.Adam)
    adamw = recipe("adamw").create(tiny_model().named_parameters())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01


def test_no_weight_decay_on_bias_and_norm_puts_them_in_a_zero_decay_group() -> None:
    model = tiny_model()
    optimizer = recipe("sgd", {"weight_decay": 5e-4, "no_weight_decay_on_bias_and_norm": True}).create(
        model.named_parameters()
    )
    groups = {g["group_name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 5e-4
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["param_names"] == ["0.weight", "3.weight"]
    assert groups["no_decay"]["param_names"] == ["0.bias", "1.weight", "1.bias", "3.bias"]
    # With zero gradients, one step shrinks only the decayed weights.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in {"0.weight", "3.weight"}), name


def test_by_default_every_parameter_is_decayed() -> None:
    optimizer = recipe("sgd").create(tiny_model().named_parameters())
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 2e-4


def test_frozen_parameters_are_left_out_and_none_trainable_is_an_error() -> None:
    model = tiny_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = recipe("sgd").create(model.named_parameters())
    assert "0.weight" not in optimizer.param_groups[0]["param_names"]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        recipe("sgd").create(model.named_parameters())


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_steps_equal_torch_sgd_driven_by_hand(nesterov: bool) -> None:
    params = {**CIFAR_RECIPE, "nesterov": nesterov, "warmup_per_iteration": True}
    ours = recipe("sgd", params)
    model_ours = tiny_model()
    model_ref = copy.deepcopy(model_ours)
    optimizer_ours = ours.create(model_ours.named_parameters())
    optimizer_ref = torch.optim.SGD(model_ref.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4, nesterov=nesterov)
    generator = torch.Generator().manual_seed(1)
    iters = 3
    for epoch in range(3):
        for iteration in range(iters):
            x = torch.randn(6, 4, generator=generator)
            y = torch.randint(0, 3, (6,), generator=generator)
            lr = ours.apply_lr(optimizer_ours, epoch, iteration, iters)
            # By hand: the LDAM-DRW warm-up rate written into torch's own optimizer.
            for group in optimizer_ref.param_groups:
                group["lr"] = 0.1 * (epoch * iters + iteration + 1) / (5 * iters)
            assert lr == pytest.approx(optimizer_ref.param_groups[0]["lr"], rel=1e-12)
            for model, optimizer in ((model_ours, optimizer_ours), (model_ref, optimizer_ref)):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    for p_ours, p_ref in zip(model_ours.parameters(), model_ref.parameters(), strict=True):
        torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Invalid params are reported with the field's path.


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lr": -0.1}, "params.lr"),
        ({"milestones": [180, 160]}, "params.milestones"),
        ({"milestones": [160, 160]}, "params.milestones"),
        ({"warmup_epochs": -1}, "params.warmup_epochs"),
        ({"warmup_start_factor": 1.5}, "params.warmup_start_factor"),
        ({"gamma": 0.0}, "params.gamma"),
        ({"schedule": "linear"}, "params.schedule"),
        ({"schedule": "cosine", "milestones": [100]}, "params.milestones"),
        ({"schedule": "cosine", "min_lr": 0.5}, "params.min_lr"),
        ({"momentum": 0.0, "nesterov": True}, "params.nesterov"),
        ({"momentun": 0.9}, "params.momentun"),
    ],
)
def test_invalid_sgd_params_are_rejected_naming_the_field(params: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ibcore.validate_params("optimizer", "sgd", params)
    assert any(issue.path.startswith(field) for issue in info.value.issues), info.value.issues


def test_invalid_adam_betas_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        ibcore.validate_params("optimizer", "adamw", {"betas": [0.9, 1.0]})
    assert any(issue.path.startswith("params.betas") for issue in info.value.issues)


def test_importing_the_optimizer_plugin_does_not_import_torch() -> None:
    code = "import sys, ib_plugins_builtin.optimizers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
