"""RIDE (Wang et al., ICLR 2021) without router or distillation: the ``ride_resnet32`` backbone and the ``ride``
step, checked against the official code's numbers, then trained next to a standard run.

Reference numbers: frank-xwang/RIDE-LongTailRecognition @ ab8be5c21124612493aff87c7cf235d950bda178, files
``model/loss.py`` (``RIDELoss``) and ``model/ldam_drw_resnets/ride_resnet_cifar.py`` (``ResNet_s``), copied out of
the repository and run on torch 2.14 CPU in float32 (``.cuda()`` in ``RIDELoss.__init__`` stubbed to a no-op; the
uint8 ``torch.where`` mask left as it is, with its deprecation warning). Inputs are closed-form, so this file
rebuilds them without the official code:

- loss: ``RIDELoss(cls_num_list=CIFAR10_LT_IF100, reweight_epoch=160, **case)`` after ``_hook_before_epoch(epoch)``
  (epoch 160: before the deferred re-weighting; 161: after it), called as the official trainer does:
  ``output_logits`` = mean of the experts, ``extra_info={"logits": list of expert logits}``;
- network: ``ResNet_s(BasicBlock, [5, 5, 5], num_experts=3, num_classes=10, reduce_dimension=True, use_norm=True)``
  (the official CIFAR config) with every tensor of its state dict set by :func:`official_fill`;
- one training step: that network, ``RIDELoss``, ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)``
  (the official CIFAR optimizer), ``zero_grad``, forward, loss, backward, step, in the official trainer's order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_engine import make_trainer, tiny_config

import ibcore
from ib_plugins_builtin.steps.ride import RideParams, RideStep
from ibcore import BuildContext, ConfigError
from ibcore.protocols import Batch

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
EXPERTS, N, C = 3, 16, 10

# What the official code printed (see the module docstring).
# fmt: off
OFFICIAL = {"loss": {"default_before_reweight": 39.9803581237793,
                     "default_reweight": 50.36989212036133,
                     "cifar100_config_reweight": 48.317726135253906,
                     "cifar100_config_before": 37.690303802490234,
                     "zero_diversity_reweight": 42.95357131958008,
                     "custom": 17.97916603088379,
                     "scale30_reweight": 92.56258392333984},
            "m_list": [0.15811388194561005, 0.17969699203968048, 0.204237699508667, 0.23209114372730255,
                       0.2638290226459503, 0.2997676432132721, 0.3406752049922943, 0.38722091913223267,
                       0.4404970407485962, 0.5],
            "class_balanced": [0.05061136186122894, 0.07689979672431946, 0.12113387137651443, 0.19503666460514069,
                               0.31880536675453186, 0.5245898365974426, 0.8683489561080933, 1.4426273107528687,
                               2.4092230796813965, 3.9927237033843994],
            "diversity": [1.0, 0.9298949241638184, 0.8878598809242249, 0.8626948595046997, 0.8475748300552368,
                          0.8385448455810547, 0.833119809627533, 0.8298648595809937, 0.8279048204421997,
                          0.8267498016357422],
            "params": 770896,
            "eval_logits": [[-16.864585876464844, -18.882835388183594, -12.577069282531738, -2.697227716445923,
                             7.511025905609131, 16.32258415222168, 19.066991806030273, 13.315886497497559,
                             3.553680658340454, -6.674962997436523],
                            [-16.477773666381836, -18.40787696838379, -12.219996452331543, -2.57099986076355,
                             7.378801345825195, 15.95160961151123, 18.59116554260254, 12.942851066589355,
                             3.4065284729003906, -6.56450080871582]],
            "eval_experts": [[-20.27859878540039, -17.010684967041016, -7.4736223220825195, 2.9068620204925537],
                             [-17.39518928527832, -19.538970947265625, -12.447848320007324, -2.4441332817077637],
                             [-12.919968605041504, -20.09885025024414, -17.809738159179688, -8.554411888122559]],
            "train_logits": [[-16.296907424926758, -18.459829330444336, -12.477116584777832, -2.9094245433807373,
                              7.0597991943359375, 15.755213737487793, 18.62217140197754, 13.18757152557373,
                              3.742351531982422, -6.240246295928955],
                             [-16.12837791442871, -18.247404098510742, -12.318382263183594, -2.8557074069976807,
                              7.00172758102417, 15.593754768371582, 18.40980339050293, 13.02131175994873,
                              3.6793997287750244, -6.191508769989014]],
            "grad_1": [[0.00039269065018743277, 0.001458548242226243, 0.006412350572645664, -0.06420863419771194,
                        0.026698369532823563, 0.018068736419081688, 0.006889481097459793, 0.002447039820253849,
                        0.0011846964480355382, 0.0006567200180143118],
                       [0.043081216514110565, 0.0053853909485042095, 0.0013854802818968892, -0.06118319183588028,
                        0.0019073650473728776, 0.002221439965069294, 0.002122055273503065, 0.0016845021164044738,
                        0.00127897085621953, 0.0021167676895856857],
                       [0.00027416771627031267, 0.00047774467384442687, 0.0008472237386740744, -0.06120770424604416,
                        0.003258624579757452, 0.008657741360366344, 0.017536068335175514, 0.01836276613175869,
                        0.009202409535646439, 0.0025909568648785353]],
            "step_1": {"loss": 114.39887237548828,
                       "conv1.weight": [0.21481259167194366, 0.4495684802532196, 0.5333884358406067,
                                        0.4906378388404846, 0.2900896370410919, 0.06323904544115067],
                       "linears.0.weight": [0.46297168731689453, 0.4250437319278717, 0.3632493019104004,
                                            0.30752360820770264, 0.23584727942943573, 0.16980710625648499],
                       "layer3s.2.4.conv2.weight": [0.023211918771266937, 0.07192940264940262, 0.0954844206571579,
                                                    0.060474950820207596, 0.024129919707775116,
                                                    -0.023427749052643776],
                       "layer2s.1.0.bn1.running_var": [1.8629300594329834, 2.2045018672943115, 2.1595513820648193,
                                                       2.0078322887420654, 1.9176981449127197, 1.8882498741149902]},
            "grad_161": [[0.00019054074073210359, 0.0004935193574056029, 0.001457731705158949, -0.014833307825028896,
                          0.003645362099632621, 0.003370686899870634, 0.00258179591037333, 0.0016719481209293008,
                          0.0009658604394644499, 0.0005073414067737758],
                         [0.0035301074385643005, 0.0006210074061527848, 0.0006646040128543973, -0.012358115054666996,
                          0.0017318761674687266, 0.002149519044905901, 0.0020693072583526373, 0.0015588004607707262,
                          0.0009766739094629884, 0.0006341937114484608],
                         [0.0001665071613388136, 0.0003108989621978253, 0.0006102840416133404, -0.012364549562335014,
                          0.001913341460749507, 0.0026539473328739405, 0.0025567796546965837, 0.0018886288162320852,
                          0.0013593705371022224, 0.0007102273521013558]],
            "step_161": {"loss": 119.36003875732422,
                         "conv1.weight": [0.004977143835276365, 0.31745630502700806, 0.5056552886962891,
                                          1.4129505157470703, 1.0533790588378906, 0.6674661636352539],
                         "linears.0.weight": [0.3601015508174896, 0.31702274084091187, 0.2696639597415924,
                                              0.21990253031253815, 0.1672070026397705, 0.11311487853527069],
                         "layer3s.2.4.conv2.weight": [0.023437347263097763, 0.06724696606397629, 0.08857818692922592,
                                                      0.07126503437757492, 0.032096296548843384,
                                                      -0.01216150913387537],
                         "layer2s.1.0.bn1.running_var": [1.8629300594329834, 2.2045018672943115, 2.1595513820648193,
                                                         2.0078322887420654, 1.9176981449127197, 1.8882498741149902]}}
# fmt: on

LOSS_CASES: dict[str, dict[str, Any]] = {  # RIDELoss kwargs; "epoch" is what _hook_before_epoch got
    "default_before_reweight": {"epoch": 160},
    "default_reweight": {"epoch": 161},
    "cifar100_config_reweight": {"epoch": 161, "additional_diversity_factor": -0.45},
    "cifar100_config_before": {"epoch": 1, "additional_diversity_factor": -0.45},
    "zero_diversity_reweight": {"epoch": 161, "additional_diversity_factor": 0.0},
    "custom": {
        "epoch": 161,
        "additional_diversity_factor": -0.3,
        "base_diversity_temperature": 1.5,
        "reweight_factor": 0.2,
        "max_m": 0.3,
        "s": 20,
        "base_loss_factor": 0.7,
    },
    "scale30_reweight": {"epoch": 161, "amplitude": 30.0},
}


def fixed_expert_logits(amplitude: float = 6.0) -> torch.Tensor:
    """(3, 16, 10) float32 expert logits, ``amplitude * sin(0.37 i + 0.11)`` over the flat index i."""
    i = torch.arange(EXPERTS * N * C, dtype=torch.float64).reshape(EXPERTS, N, C)
    return (amplitude * torch.sin(0.37 * i + 0.11)).float()


def fixed_targets() -> torch.Tensor:
    return (torch.arange(N) * 7 + 3) % C


def official_fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The value of the official state-dict entry ``name``: closed-form, the same on any machine."""
    numel = math.prod(shape)
    offset = zlib.crc32(name.encode()) % 1000
    v = torch.sin(0.618 * torch.arange(numel, dtype=torch.float64) + 0.001 * offset)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * v.abs()
    elif name.endswith("running_mean"):
        v = 0.1 * v
    elif name.endswith(("bn1.weight", "bn2.weight")):
        v = 1.0 + 0.2 * v
    elif name.endswith("bias"):
        v = 0.05 * v
    else:
        fan_in = numel // shape[0] if len(shape) > 1 else numel
        v = v * (2.0 / fan_in) ** 0.5 * 1.2
    return v.float().reshape(shape)


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict filled as the official one was: its ``linears.i.weight`` is (D, C), ours (C, D)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("classifier.linears."):
            official = key.removeprefix("classifier.")
            state[key] = official_fill(official, tuple(value.shape[::-1])).t().contiguous()
        elif value.is_floating_point():
            state[key] = official_fill(key, tuple(value.shape))
        else:
            state[key] = value
    return state


def fixed_images() -> torch.Tensor:
    return torch.sin(0.1 * torch.arange(4 * 3 * 32 * 32, dtype=torch.float64)).float().reshape(4, 3, 32, 32)


def official_model() -> torch.nn.Module:
    """ride_resnet32 as the official CIFAR config builds it, holding the reference weights."""
    model = ibcore.build("backbone", "ride_resnet32", {}, context=BuildContext(num_classes=C))
    model.load_state_dict(official_state(model), strict=True)
    return model


def step_for(case: dict[str, Any]) -> tuple[RideStep, float]:
    """The ride step that computes an official loss case (reweight after epoch 160), and the logits' amplitude."""
    kwargs = dict(case)
    epoch, amplitude = kwargs.pop("epoch"), kwargs.pop("amplitude", 6.0)
    return RideStep(RideParams(reweight=epoch > 160, **kwargs), CIFAR10_LT_IF100), amplitude


class FakeRun:
    """A StepRun around a bare model (what the trainer's RunView offers, without the trainer)."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, mixer: Any = None, epoch: int = 0
    ) -> None:
        self.name, self.model, self.optimizer, self.mixer, self.loss, self.epoch = (
            "r",
            model,
            optimizer,
            mixer,
            None,
            epoch,
        )
        self.context = BuildContext(num_classes=C, class_counts=tuple(CIFAR10_LT_IF100))
        self.forwards = 0

    def forward(self, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        self.forwards += 1
        return self.model(x)  # type: ignore[no-any-return]

    def mix_plan(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


# -- the loss ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_matches_the_official_ride_loss(case: str) -> None:
    step, amplitude = step_for(LOSS_CASES[case])
    experts = fixed_expert_logits(amplitude)
    value = step.loss(experts.mean(dim=0), experts, fixed_targets()).item()
    assert value == pytest.approx(OFFICIAL["loss"][case], rel=1e-6, abs=0.0)


def test_per_class_constants_match_the_official_buffers() -> None:
    from ib_plugins_builtin.steps.ride import class_balanced_weights, diversity_weights, ldam_margins

    # float32, as the official buffers: equal to the last bit
    for ours, official in (
        (ldam_margins(CIFAR10_LT_IF100, 0.5), OFFICIAL["m_list"]),
        (class_balanced_weights(CIFAR10_LT_IF100), OFFICIAL["class_balanced"]),
        (diversity_weights(CIFAR10_LT_IF100, 0.05), OFFICIAL["diversity"]),
    ):
        assert torch.equal(torch.tensor(ours, dtype=torch.float32), torch.tensor(official, dtype=torch.float32))


@pytest.mark.parametrize("epoch", [1, 161])
def test_loss_gradient_matches_the_official_one(epoch: int) -> None:
    experts = fixed_expert_logits().requires_grad_(True)
    step, _ = step_for({"epoch": epoch})
    step.loss(experts.mean(dim=0), experts, fixed_targets()).backward()
    assert experts.grad is not None
    torch.testing.assert_close(experts.grad[:, 0, :], torch.tensor(OFFICIAL[f"grad_{epoch}"]), rtol=1e-5, atol=1e-8)


def test_the_mean_logits_carry_no_gradient_of_the_diversity_term() -> None:
    # The official code takes softmax(mean / T) under no_grad: with no LDAM term, only the expert side has one.
    experts = fixed_expert_logits().requires_grad_(True)
    step = RideStep(RideParams(base_loss_factor=0.0), CIFAR10_LT_IF100)
    mean = experts.detach().mean(dim=0).requires_grad_(True)
    step.loss(mean, experts, fixed_targets()).backward()
    assert mean.grad is None or not mean.grad.any()
    assert experts.grad is not None and experts.grad.abs().sum() > 0


# -- the network ------------------------------------------------------------------------------------------------


def test_network_has_the_official_size_and_output() -> None:
    model = official_model()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL["params"]  # 770,896 with 10 classes
    assert model.feature_dim == 3 * 48 and model.num_experts == 3 and model.num_mix_layers == 3
    x = fixed_images()
    model.eval()
    with torch.no_grad():
        logits, experts = model(x), model.expert_logits(x)
        via_features = model.classifier(model.features(x))
    torch.testing.assert_close(logits[:2], torch.tensor(OFFICIAL["eval_logits"]), rtol=0, atol=2e-5)
    torch.testing.assert_close(experts[:, 0, :4], torch.tensor(OFFICIAL["eval_experts"]), rtol=0, atol=2e-5)
    # the aggregate is the experts' mean, and evaluation's classifier(features(x)) is the same thing
    assert experts.shape == (3, 4, C)
    assert torch.equal(experts.mean(dim=0), logits) and torch.equal(via_features, logits)
    model.train()  # BatchNorm on batch statistics, as in a training step
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:2], torch.tensor(OFFICIAL["train_logits"]), rtol=0, atol=2e-5)


# ``torch.manual_seed(0)`` then the official network (use_norm=True): its first initial weights.
OFFICIAL_INIT_SEED0 = {
    "conv1.weight": [-0.039471015334129333, -0.31514543294906616, -0.25334057211875916, -0.16271023452281952],
    "layer3s.2.4.conv2.weight": [-0.01811777986586094, -0.022868584841489792, -0.00809441227465868, 0.0279323048889637],
    "linears.2.weight": [-0.05303443223237991, 0.07931986451148987, 0.16986306011676788, 0.10293002426624298],
}


def test_one_seed_draws_the_official_initial_weights() -> None:
    # The modules are built, and their weights drawn, in the official order (the cosine weight transposed).
    # The reference values come from torch's CPU generator (torch 2.14), stable across releases so far.
    torch.manual_seed(0)
    state = ibcore.build("backbone", "ride_resnet32", {}, context=BuildContext(num_classes=C)).state_dict()
    drawn = {
        "conv1.weight": state["conv1.weight"].flatten()[:4],
        "layer3s.2.4.conv2.weight": state["layer3s.2.4.conv2.weight"].flatten()[:4],
        "linears.2.weight": state["classifier.linears.2.weight"][0, :4],
    }
    for key, values in drawn.items():
        torch.testing.assert_close(values, torch.tensor(OFFICIAL_INIT_SEED0[key]), rtol=1e-6, atol=0, msg=key)
    norms = state["classifier.linears.0.weight"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(C))  # unit-norm class vectors


@pytest.mark.parametrize("epoch", [1, 161])
def test_one_training_step_matches_the_official_trainer(epoch: int) -> None:
    model = official_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    run = FakeRun(model, optimizer)
    step, _ = step_for({"epoch": epoch})
    losses = step([run], {"r": Batch(fixed_images(), torch.tensor([0, 1, 9, 3]))})  # type: ignore[list-item]
    reference = OFFICIAL[f"step_{epoch}"]
    assert run.forwards == 1  # the expert logits come from the pass through run.forward (its DDP wrapper)
    assert losses["r"].item() == pytest.approx(reference["loss"], rel=1e-6)
    state = model.state_dict()
    after = {
        "conv1.weight": state["conv1.weight"].flatten()[:6],
        "linears.0.weight": state["classifier.linears.0.weight"][0, :6],  # official (D, C)[:6, 0]
        "layer3s.2.4.conv2.weight": state["layer3s.2.4.conv2.weight"].flatten()[:6],
        "layer2s.1.0.bn1.running_var": state["layer2s.1.0.bn1.running_var"][:6],
    }
    for key, value in after.items():
        # float32 sums in another order: the updates (up to ~9) agree to ~1e-5 of their size
        torch.testing.assert_close(value, torch.tensor(reference[key]), rtol=1e-5, atol=1e-4, msg=key)


def test_reweight_epoch_switches_as_the_official_hook() -> None:
    # official: _hook_before_epoch(epoch) with 1-based epochs re-weights when epoch > reweight_epoch; ours reads the
    # 0-based run.epoch, so reweight_epoch 160 re-weights from run.epoch 160, the 161st epoch
    step = RideStep(RideParams(reweight_epoch=160), CIFAR10_LT_IF100)
    assert [step.reweights_in(e) for e in (0, 159, 160, 199)] == [False, False, True, True]
    for epoch, reference in ((159, "step_1"), (160, "step_161")):  # official epochs 160 (= 1: no weights) and 161
        model = official_model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        run = FakeRun(model, optimizer, epoch=epoch)
        losses = step([run], {"r": Batch(fixed_images(), torch.tensor([0, 1, 9, 3]))})  # type: ignore[list-item]
        assert losses["r"].item() == pytest.approx(OFFICIAL[reference]["loss"], rel=1e-6)
    del run.epoch  # a view without the epoch: a clear error naming the alternative
    with pytest.raises(ConfigError, match="switch the re-weighting on with a stage"):
        step([run], {"r": Batch(fixed_images(), torch.tensor([0, 1, 9, 3]))})  # type: ignore[list-item]


def test_backbone_protocol_on_one_channel_digits() -> None:
    context = BuildContext(num_classes=C)
    model = ibcore.build("backbone", "ride_resnet32", {"in_channels": 1, "init_seed": 4}, context=context)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (5, C) and model.features(x).shape == (5, model.feature_dim)
        for layer in range(model.num_mix_layers + 1):
            # an identity mix changes nothing; reversing the batch at any layer (in every expert) reverses the logits
            assert torch.equal(model.forward_mixed(x, layer, lambda h: h), logits), layer
            torch.testing.assert_close(model.forward_mixed(x, layer, lambda h: h.flip(0)), logits.flip(0))
        # every expert sees the mix: sample 0's stage-3 activations everywhere give sample 0's logits everywhere
        mixed = model.forward_mixed(x, 3, lambda h: h[:1].expand_as(h))
        torch.testing.assert_close(mixed, logits[:1].expand(5, -1))
    with pytest.raises(ConfigError, match=r"ride_resnet32 can mix at layers 0\.\.3"):
        model.forward_mixed(x, 4, lambda h: h)
    # the same seed draws the same model; a deep copy and a pickle give the same logits
    again = ibcore.build("backbone", "ride_resnet32", {"in_channels": 1, "init_seed": 4}, context=context)
    again.eval()
    for other in (again, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(other(x), logits)
    # classifier re-training re-draws every expert's classifier and nothing else
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"classifier.linears.{i}.weight" for i in range(3)}


def test_backbone_options() -> None:
    context = BuildContext(num_classes=7)
    wide = ibcore.build("backbone", "ride_resnet32", {"reduce_dimension": False, "num_experts": 2}, context=context)
    assert wide.feature_dim == 2 * 64 and wide.classifier.s == 30.0
    linear = ibcore.build("backbone", "ride_resnet32", {"classifier": "linear", "num_experts": 1}, context=context)
    assert isinstance(linear.classifier.linears[0], torch.nn.Linear) and linear.classifier.s == 1.0
    x = torch.randn(2, 3, 32, 32)
    assert linear(x).shape == (2, 7) and linear.expert_logits(x).shape == (1, 2, 7)
    with pytest.raises(ConfigError, match="s scales the cosine classifier only"):
        ibcore.build("backbone", "ride_resnet32", {"classifier": "linear", "s": 16}, context=context)
    with pytest.raises(ibcore.ContextError, match="num_classes"):
        ibcore.build("backbone", "ride_resnet32", {})


# -- the step ---------------------------------------------------------------------------------------------------


def test_step_refuses_what_it_cannot_train() -> None:
    optimizer_of = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    step = ibcore.build("step", "ride", {}, context=BuildContext(num_classes=C, class_counts=tuple(CIFAR10_LT_IF100)))
    batch = {"r": Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))}
    plain = ibcore.build("backbone", "resnet20", {}, context=BuildContext(num_classes=C))
    with pytest.raises(ConfigError, match="needs a multi-expert backbone .*ride_resnet32.*CifarResNet does not"):
        step([FakeRun(plain, optimizer_of(plain))], batch)
    ride = official_model()
    with pytest.raises(ConfigError, match="step 'ride' does not mix"):
        step([FakeRun(ride, optimizer_of(ride), mixer=object())], batch)
    counts = BuildContext(num_classes=C, class_counts=tuple(CIFAR10_LT_IF100))
    with pytest.raises(ConfigError, match="reweight_factor 30.0 makes a class's diversity temperature non-positive"):
        ibcore.build("step", "ride", {"reweight_factor": 30.0}, context=counts)
    with pytest.raises(ibcore.ContextError, match="class_counts"):
        ibcore.build("step", "ride", {}, context=BuildContext(num_classes=C))
    with pytest.raises(ibcore.ContextError, match="at least one training sample per class"):
        ibcore.build("step", "ride", {}, context=BuildContext(num_classes=3, class_counts=(5, 0, 1)))


def test_params_are_validated_with_their_paths() -> None:
    config = tiny_config()
    config["runs"].append(
        {
            "name": "ride",
            "backbone": {"name": "ride_resnet32", "params": {"in_channels": 1, "num_experts": 0}},
            "step": {"name": "ride", "params": {"reweight_factr": 0.1, "max_m": 0}},
            "stages": [{"from_epoch": 1, "step": {"name": "ride", "params": {"reweight": True, "s": -1}}}],
        }
    )
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == [
        "runs[2].backbone.params.num_experts",
        "runs[2].step.params.max_m",
        "runs[2].step.params.reweight_factr",
        "runs[2].stages[0].step.params.s",
    ]
    assert "did you mean 'reweight_factor'" in issues[2].message
    config["runs"][2] = {
        "name": "ride",
        "backbone": {"name": "ride_resnet32", "params": {"classifier": "linear", "s": 2}},
        "step": {"name": "ride", "params": {"reweight": True, "reweight_epoch": 160}},
    }
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == ["runs[2].backbone.params", "runs[2].step.params"]
    assert "either reweight (always on) or reweight_epoch" in issues[1].message


def test_a_ride_run_trains_on_its_own_next_to_fused_standard_runs(tmp_path: Path) -> None:
    config = tiny_config(fused="on")
    config["data"]["batch_size"] = 32
    config["data"]["dataset"]["params"]["test_per_class"] = 5
    config["runs"].append(
        {
            "name": "ride",
            "backbone": {"name": "ride_resnet32", "params": {"in_channels": 1}},
            "step": {"name": "ride"},
            # deferred re-weighting from the second epoch: the stage builds the step again
            "stages": [{"from_epoch": 1, "step": {"name": "ride", "params": {"reweight": True}}}],
        }
    )
    # the same, switched by the step itself from the epoch its view gives
    config["runs"].append({**config["runs"][-1], "name": "ride_at_epoch", "stages": []})
    config["runs"][-1]["step"] = {"name": "ride", "params": {"reweight_epoch": 1}}
    trainer = make_trainer(config, tmp_path, smoke=2)  # 2 batches of each epoch: a ResNet-32 x 3 is slow on a CPU
    results = trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "run 'ride' trains on its own (its step 'ride' is not 'standard')" in log
    assert "run 'ride_at_epoch' trains on its own (its step 'ride' is not 'standard')" in log
    assert "2 runs stacked (ce, focal)" in log
    ride = next(run for run in trainer.runs if run.name == "ride")
    assert isinstance(ride.step, RideStep) and ride.step.params.reweight  # the stage's step, from epoch 2
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [line["train_loss"] for line in lines if line["split"] == "train" and line["run"] == "ride"]
    assert len(train_losses) == 2 and all(math.isfinite(loss) for loss in train_losses)
    # same weights, batches and epochs of re-weighting: the two switches train the same numbers
    at_epoch = [line["train_loss"] for line in lines if line["split"] == "train" and line["run"] == "ride_at_epoch"]
    assert at_epoch == train_losses
    for row in results.rows:
        assert row["status"] == "ok" and math.isfinite(row["acc1"]) and 0 <= row["acc1"] <= 100, row


def test_ib_list_shows_both_with_their_citation() -> None:
    for kind, name in (("backbone", "ride_resnet32"), ("step", "ride")):
        listed = subprocess.run(
            [sys.executable, "-m", "ibcore.cli", "list", kind, name, "--citations"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert listed.returncode == 0, listed.stderr
        assert name in listed.stdout and "Wang et al., ICLR 2021" in listed.stdout, listed.stdout
        assert "router" in listed.stdout


def test_registering_imports_no_torch() -> None:
    code = (
        "import sys, ib_plugins_builtin.backbones.ride, ib_plugins_builtin.steps.ride; "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_under_data_parallel_two_processes_match_one_in_float64(tmp_path: Path) -> None:
    # The step takes the expert logits from the pass through run.forward, i.e. through the run's DDP wrapper:
    # the gradients are averaged over the ranks, so two processes compute what one does, to rounding error.
    # Without re-weighting: a class-weighted cross-entropy divides by the weights of each rank's own targets,
    # so under DDP it is the mean of the ranks' weighted means, not the global one (as for every weighted loss).
    from test_distributed import (
        LAUNCHER_FLOAT64,
        assert_close_models,
        experiment,
        final_models,
        launch_env,
        run_dir_in,
        torchrun,
    )

    ride = {
        "name": "ride",
        "backbone": {"name": "ride_resnet32", "params": {"in_channels": 1}},
        "step": {"name": "ride"},
    }
    config = experiment(epochs=2, runs=[ride])
    config["data"]["dataset"]["params"]["test_per_class"] = 5
    (tmp_path / "exp.yaml").write_text(json.dumps(config))
    (tmp_path / "float64_ib.py").write_text(LAUNCHER_FLOAT64)
    command = torchrun("run", "exp.yaml", "--quiet", "--smoke", "3", "--out", "two", script=tmp_path / "float64_ib.py")
    done = subprocess.run(command, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = ibcore.run(config, out_dir=tmp_path / "one", quiet=True, smoke=3)
    finally:
        torch.set_default_dtype(previous)
    assert_close_models(final_models(run_dir_in(tmp_path / "two")), final_models(single.run_dir), rtol=1e-9)


def test_the_documented_config_validates_and_tau_norm_refuses_the_experts() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "components" / "ride.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", page, re.S)
    assert block is not None
    assert ibcore.validate(yaml.safe_load(block.group(1))) == []
    model = official_model().eval()
    tau_norm = ibcore.build("adjustment", "tau_norm", {"tau": 1.0}, context=BuildContext(num_classes=C))
    features = model.features(fixed_images())
    with pytest.raises(ibcore.ProtocolError, match="needs model.classifier, a torch module with a .weight tensor"):
        tau_norm(model, features, model.classifier(features))
