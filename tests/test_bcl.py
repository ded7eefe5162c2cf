"""BCL (Zhu et al., CVPR 2022): the ``bcl_resnet32`` backbone and the ``bcl`` step, checked against the official
code's numbers, then trained next to standard runs.

Reference numbers: FlamieZhu/Balanced-Contrastive-Learning @ f72d0703794bcec8b00da86774c9d780dc721701, files
``loss/contrastive.py`` (``BalSCL``), ``loss/logitadjust.py`` (``LogitAdjust``) and ``models/resnext.py``
(``BCLModel``), copied out of the repository and run on torch 2.14 CPU (``torch.cuda.FloatTensor`` in
``LogitAdjust.__init__``, CUDA only as committed, replaced by its CPU float32 equivalent). Inputs are closed-form,
so this file rebuilds them without the official code:

- losses: ``BalSCL(CIFAR10_LT_IF100, temperature)(centres, features, targets)`` and
  ``LogitAdjust(CIFAR10_LT_IF100)(logits, targets)`` on :func:`fixed_features`, :func:`fixed_centres`,
  :func:`fixed_targets`, :func:`fixed_logits`;
- one training step: ``BCLModel(num_classes=10, name="resnet32", use_norm=True, feat_dim=128)`` with the built-in
  ResNet-32's ``features`` registered as its encoder (``model_dict["resnet32"] = [encoder, 64]``; the official
  repository has no CIFAR network), every tensor of its state dict set by :func:`official_fill`, then one
  iteration of ``main.py``'s ``train()`` with its defaults (``--alpha 1.0 --beta 0.35 --temp 0.07``,
  ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``) on three views (:func:`fixed_images`).

The components are not entry points yet: each test imports their modules inside a registry snapshot (the
``bcl`` fixture), so nothing registered here leaks into other tests.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import pickle
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_engine import make_trainer, tiny_config

import ibcore
from ibcore import BuildContext, ConfigError
from ibcore.protocols import Batch

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
N, D, C = 8, 16, 10

# What the official code printed (see the module docstring).
OFFICIAL_BALSCL = {
    ("float64", 0.07): 9.362736872596269,
    ("float64", 0.1): 6.415172856062787,
    ("float64", 0.5): 2.4616064801427116,
    ("float32", 0.07): 9.362736701965332,
    ("float32", 0.1): 6.415173053741455,
    ("float32", 0.5): 2.461606502532959,
}
OFFICIAL_LOGIT_ADJUST = {"float64": 5.061101902392559, "float32": 5.061101913452148}
OFFICIAL_BALSCL_GRAD = {  # temperature 0.07, float64
    "features[0]": [
        0.6710690583118137, 1.010117858770659, 0.5178500749228747, -0.36250303966816716,
        -0.756161545085406, -0.48575592080336827, -0.1804028678527179, -0.1339942858912745,
    ],
    "centres[3]": [
        0.06611282243552856, -0.014816642662199953, -0.0892683582259109, -0.08055002274164749,
        -0.011422725579662502, 0.03394194745328761, 0.02523105605075958, 0.013398611620838717,
    ],
}  # fmt: skip
OFFICIAL_STEP = {
    "loss": 4.10805606842041,
    "ce": 3.26224422454834,
    "scl": 2.4166057109832764,
    "logits[0]": [
        2.453040599822998, -0.9210718274116516, -1.9666106700897217, 2.00866436958313, 0.8645256757736206,
        -2.459139585494995, 0.5351834297180176, 2.175645112991333, -1.7549114227294922, -1.2261854410171509,
    ],
    # after the step: ours key -> official values (classifier.weight: the official fc.weight[:6, 0], (D, C))
    "stem.0.weight": [
        0.26944419741630554, 0.3320181369781494, 0.27669161558151245, 0.11300501227378845,
        -0.08680014312267303, -0.2551725506782532,
    ],
    "classifier.weight": [
        0.08721750229597092, 0.10187527537345886, 0.0674610361456871, -0.025549639016389847,
        -0.17054054141044617, -0.24179872870445251,
    ],
    "head.0.weight": [
        0.1649872213602066, 0.2119888812303543, 0.1783975064754486, 0.079041488468647,
        -0.04800935462117195, -0.1599370688199997,
    ],
    "head.3.weight": [
        0.16444137692451477, 0.21168702840805054, 0.18064530193805695, 0.0827348530292511,
        -0.04574185982346535, -0.1572808027267456,
    ],
    "head_fc.0.weight": [
        0.01847924292087555, 0.13750100135803223, 0.20565809309482574, 0.1977376788854599,
        0.11666972190141678, -0.007556968834251165,
    ],
    "head_fc.3.bias": [
        0.02436184696853161, 0.04483677074313164, 0.049255602061748505, 0.03535318374633789,
        0.007898768410086632, -0.022113136947155,
    ],
    "head_fc.1.running_mean": [
        0.05066244676709175, 0.09018611162900925, 0.09347941726446152, 0.05771445482969284,
        0.005961289629340172, -0.046503946185112,
    ],
    "head.1.running_var": [
        1.0649008750915527, 1.2661429643630981, 1.3658430576324463, 1.2774585485458374,
        1.0558124780654907, 1.041637897491455,
    ],
    "stages.2.4.conv2.weight": [
        0.022830752655863762, 0.060483429580926895, 0.07899902760982513, 0.06470733135938644,
        0.031218329444527626, -0.01077176071703434,
    ],
    "stages.2.4.bn2.running_var": [
        1.279280662536621, 1.3546439409255981, 1.260375738143921, 1.0328094959259033,
        1.0473796129226685, 1.268791913986206,
    ],
}  # fmt: skip
OFFICIAL_PARAMS = 489_360  # BCLModel(feat_dim=128) on ResNet-32, 10 classes, hidden width 64 (the encoder's)


@pytest.fixture
def bcl() -> Iterator[types.SimpleNamespace]:
    """The ``bcl`` step and ``bcl_resnet32`` registered (locally, inside a snapshot) and their modules."""
    with ibcore.registry_snapshot():
        step = importlib.import_module("ib_plugins_builtin.steps.bcl")
        backbone = importlib.import_module("ib_plugins_builtin.backbones.bcl")
        names = {(info.kind, info.name) for info in ibcore.list_components(load=False)}
        for kind, factory in (("step", step.build_bcl), ("backbone", backbone.build_bcl_resnet32)):
            info = factory.__ib_component__
            if (kind, info.name) not in names:  # imported before, in another snapshot: register it again
                ibcore.registry.register(
                    kind, info.name, factory, params=info.params, description=info.description, citation=info.citation
                )
        yield types.SimpleNamespace(step=step, backbone=backbone)


def fixed_features() -> torch.Tensor:
    """(8, 2, 16) float64 unit vectors: two views of eight samples."""
    i = torch.arange(N * 2 * D, dtype=torch.float64).reshape(N, 2, D)
    return F.normalize(torch.sin(0.7 * i + 0.3) + 0.5 * torch.cos(1.3 * i), dim=2)


def fixed_centres() -> torch.Tensor:
    """(10, 16) float64 unit vectors: one centre per class."""
    i = torch.arange(C * D, dtype=torch.float64).reshape(C, D)
    return F.normalize(torch.cos(0.45 * i + 0.1) + 0.2 * torch.sin(2.1 * i), dim=1)


def fixed_targets() -> torch.Tensor:
    return torch.tensor([0, 3, 3, 9, 1, 0, 7, 3])  # repeated classes, and classes absent from the batch


def fixed_logits() -> torch.Tensor:
    return 4.0 * torch.sin(0.9 * torch.arange(N * C, dtype=torch.float64).reshape(N, C) + 0.2)


def official_fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The value of the state-dict entry ``name`` (our names): closed-form, the same on any machine."""
    numel = math.prod(shape)
    offset = zlib.crc32(name.encode()) % 1000
    v = torch.sin(0.618 * torch.arange(numel, dtype=torch.float64) + 0.001 * offset)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * v.abs()
    elif name.endswith("running_mean"):
        v = 0.1 * v
    elif name.endswith("bias"):
        v = 0.05 * v
    elif len(shape) == 1:  # BatchNorm weights
        v = 1.0 + 0.2 * v
    else:
        v = v * (2.0 / (numel // shape[0])) ** 0.5 * 1.2
    return v.float().reshape(shape)


def fixed_images(view: int) -> torch.Tensor:
    i = torch.arange(4 * 3 * 32 * 32, dtype=torch.float64)
    return torch.sin(0.1 * i + 0.7 * view).float().reshape(4, 3, 32, 32)


def context() -> BuildContext:
    return BuildContext(num_classes=C, class_counts=tuple(CIFAR10_LT_IF100))


def official_model(hidden_dim: int = 64) -> torch.nn.Module:
    """bcl_resnet32 as the official BCLModel (hidden width = the encoder's 64), holding the reference weights."""
    model = ibcore.build("backbone", "bcl_resnet32", {"hidden_dim": hidden_dim}, context=context())
    state = {k: official_fill(k, tuple(v.shape)) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


class FakeRun:
    """A StepRun around a bare model (what the trainer's RunView offers, without the trainer)."""

    def __init__(self, model: torch.nn.Module, loss: Any = None, mixer: Any = None) -> None:
        self.name, self.model, self.mixer, self.context, self.epoch = "r", model, mixer, context(), 0
        self.loss = loss if loss is not None else ibcore.build("loss", "logit_adjusted", {}, context=context())
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.forwards = 0

    def forward(self, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        self.forwards += 1
        return self.model(x)  # type: ignore[no-any-return]

    def mix_plan(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


# -- the losses -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "temperature"), sorted(OFFICIAL_BALSCL))
def test_balanced_contrastive_loss_matches_the_official_balscl(
    bcl: types.SimpleNamespace, dtype: str, temperature: float
) -> None:
    kind = getattr(torch, dtype)
    value = bcl.step.balanced_contrastive_loss(
        fixed_features().to(kind), fixed_targets(), fixed_centres().to(kind), temperature
    )
    assert value.dtype == kind
    assert value.item() == pytest.approx(OFFICIAL_BALSCL[(dtype, temperature)], rel=1e-6, abs=1e-6)


def test_balanced_contrastive_loss_gradient_matches_the_official_one(bcl: types.SimpleNamespace) -> None:
    features, centres = fixed_features().requires_grad_(True), fixed_centres().requires_grad_(True)
    bcl.step.balanced_contrastive_loss(features, fixed_targets(), centres, 0.07).backward()
    assert features.grad is not None and centres.grad is not None
    expected = {key: torch.tensor(values, dtype=torch.float64) for key, values in OFFICIAL_BALSCL_GRAD.items()}
    torch.testing.assert_close(features.grad[0].flatten()[:8], expected["features[0]"])
    torch.testing.assert_close(centres.grad[3][:8], expected["centres[3]"])


def test_balanced_contrastive_loss_refuses_other_than_two_views(bcl: types.SimpleNamespace) -> None:
    three = torch.cat([fixed_features(), fixed_features()[:, :1]], dim=1)
    with pytest.raises(ValueError, match=r"features must be \(N, 2, D\)"):
        bcl.step.balanced_contrastive_loss(three, fixed_targets(), fixed_centres(), 0.1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_logit_adjusted_loss_is_the_official_logit_adjust(bcl: types.SimpleNamespace, dtype: str) -> None:
    # The step's classification term is the run's loss; the official one is LogitAdjust(tau=1) = logit_adjusted.
    loss = ibcore.build("loss", "logit_adjusted", {}, context=context())
    value = loss(fixed_logits().to(getattr(torch, dtype)), fixed_targets()).item()
    assert value == pytest.approx(OFFICIAL_LOGIT_ADJUST[dtype], rel=1e-6, abs=1e-6)


# -- the network ------------------------------------------------------------------------------------------------


def test_network_has_the_official_size_heads_and_outputs(bcl: types.SimpleNamespace) -> None:
    model = official_model()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    head = [type(m).__name__ for m in model.head]
    assert head == [type(m).__name__ for m in model.head_fc] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (model.head[0].in_features, model.head[0].out_features, model.head[3].out_features) == (64, 64, 128)
    cifar = ibcore.build("backbone", "bcl_resnet32", {}, context=context())  # the CIFAR setting: 64 -> 512 -> 128
    assert (cifar.head[0].out_features, cifar.head[3].out_features, cifar.head_fc[0].out_features) == (512, 128, 512)
    x = fixed_images(0)
    model.train()
    with torch.no_grad():
        logits, projection, centres = model.contrastive(x)
        assert torch.equal(logits, model(x))  # the logits are the model's output, recorded or not
        assert torch.equal(model.classifier(model.features(x)), logits)  # what evaluation computes
    assert projection.shape == (4, 128) and centres.shape == (C, 128)
    torch.testing.assert_close(projection.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(C))
    # cosine logits scaled by s = 30 (the official NormedLinear)
    cosine = F.normalize(model.features(x), dim=1) @ F.normalize(model.classifier.weight, dim=1).T
    torch.testing.assert_close(logits, 30.0 * cosine)
    assert logits.abs().max() <= 30.0 + 1e-4


def test_one_seed_draws_unit_class_vectors_and_classifier_retraining_redraws_only_them(
    bcl: types.SimpleNamespace,
) -> None:
    build = lambda: ibcore.build("backbone", "bcl_resnet32", {"init_seed": 2}, context=context())  # noqa: E731
    model = build()
    torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(C))
    # the official draw: uniform (D, C), every class column renormed to 1, here stored transposed
    torch.manual_seed(5)
    expected = torch.empty(64, C).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5).t()
    torch.manual_seed(5)
    model.classifier.reset_parameters()
    assert torch.equal(model.classifier.weight.detach(), expected)
    for key, value in build().state_dict().items():  # one seed, one model
        assert torch.equal(value, build().state_dict()[key]), key
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier()
    assert {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])} == {"classifier.weight"}


def test_backbone_protocol_on_one_channel_digits(bcl: types.SimpleNamespace) -> None:
    model = ibcore.build("backbone", "bcl_resnet32", {"in_channels": 1, "init_seed": 1}, context=context())
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (5, C) and model.features(x).shape == (5, model.feature_dim) == (5, 64)
        assert model.num_mix_layers == 3 and model.num_classes == C
        for layer in range(model.num_mix_layers + 1):
            assert torch.equal(model.forward_mixed(x, layer, lambda h: h), logits), layer
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(other(x), logits)
    with pytest.raises(ConfigError, match=r"bcl_resnet32 can mix at layers 0\.\.3"):
        model.forward_mixed(x, 4, lambda h: h)


def test_backbone_params_are_validated(bcl: types.SimpleNamespace) -> None:
    linear = ibcore.build("backbone", "bcl_resnet32", {"use_norm": False}, context=context())
    assert isinstance(linear.classifier, torch.nn.Linear) and linear.classifier.bias is not None
    with torch.no_grad():
        linear.train()
        _, projection, centres = linear.contrastive(torch.randn(3, 3, 32, 32))
    assert projection.shape == (3, 128) and centres.shape == (C, 128)  # centres from the (C, D) weight rows
    with pytest.raises(ConfigError, match="scale applies to the cosine classifier"):
        ibcore.build("backbone", "bcl_resnet32", {"use_norm": False, "scale": 16}, context=context())
    for bad in ({"feat_dim": 0}, {"hidden_dim": -1}, {"scale": 0}, {"head": "mlp"}):
        with pytest.raises(ConfigError):
            ibcore.build("backbone", "bcl_resnet32", bad, context=context())
    with pytest.raises(ibcore.ContextError, match="num_classes"):
        ibcore.build("backbone", "bcl_resnet32", {})


# -- the step ---------------------------------------------------------------------------------------------------


def test_one_training_step_matches_the_official_trainer(bcl: types.SimpleNamespace) -> None:
    model = official_model()
    model.train()
    run = FakeRun(model)
    step = ibcore.build("step", "bcl", {}, context=context())  # official defaults: alpha 1, beta 0.35, temp 0.07
    y = torch.tensor([0, 1, 9, 3])
    with torch.no_grad():
        logits = model(torch.cat([fixed_images(0), fixed_images(1), fixed_images(2)]))[:4]
    model.load_state_dict(official_model().state_dict())  # undo that pass's BatchNorm statistics
    torch.testing.assert_close(logits[0], torch.tensor(OFFICIAL_STEP["logits[0]"]), rtol=1e-5, atol=1e-5)
    losses = step([run], {"r": Batch(fixed_images(0), y, (fixed_images(1), fixed_images(2)))})
    assert run.forwards == 1  # every view in one pass through run.forward (one BatchNorm batch, the DDP wrapper)
    assert losses["r"].item() == pytest.approx(OFFICIAL_STEP["loss"], rel=1e-6)
    assert OFFICIAL_STEP["loss"] == pytest.approx(OFFICIAL_STEP["ce"] + 0.35 * OFFICIAL_STEP["scl"], rel=1e-7)
    state = model.state_dict()
    for key in [k for k in OFFICIAL_STEP if k in state]:
        # 2-d: row 0 (the official fc.weight[:6, 0] is our classifier.weight[0, :6]); otherwise the first six
        value = state[key][0, :6] if state[key].dim() == 2 else state[key].flatten()[:6]
        # float32 sums in another order: the updates agree to ~1e-5 of their size
        torch.testing.assert_close(value, torch.tensor(OFFICIAL_STEP[key]), rtol=1e-5, atol=1e-5, msg=key)
    assert len([k for k in OFFICIAL_STEP if k in state]) == 10


def test_one_view_contrasts_the_batch_with_its_view(bcl: types.SimpleNamespace) -> None:
    model = official_model(hidden_dim=32)
    model.train()
    reference = copy.deepcopy(model)
    run = FakeRun(model)
    params = {"alpha": 2.0, "beta": 0.6, "temperature": 0.1}  # the CIFAR setting
    step = ibcore.build("step", "bcl", params, context=context())
    y = torch.tensor([0, 1, 9, 3])
    x, view = fixed_images(0), fixed_images(1)
    losses = step([run], {"r": Batch(x, y, (view,))})
    # the same arithmetic spelled out: one pass of (batch, view), CE on the batch's logits, BalSCL on both
    logits, projection, centres = reference.contrastive(torch.cat([x, view]))
    pair = torch.stack([projection[:4], projection[4:]], dim=1)
    expected = 2.0 * run.loss(logits[:4], y) + 0.6 * bcl.step.balanced_contrastive_loss(pair, y, centres, 0.1)
    assert losses["r"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert run.forwards == 1
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, reference.state_dict()[k])]
    assert {"head.0.weight", "head_fc.0.weight", "classifier.weight", "stem.0.weight"} <= set(moved)


def test_step_refuses_what_it_cannot_train(bcl: types.SimpleNamespace) -> None:
    step = ibcore.build("step", "bcl", {}, context=context())
    model = official_model()
    x, y = fixed_images(0), torch.tensor([0, 1, 9, 3])
    with pytest.raises(ConfigError, match=r"needs an extra view: add `views: \[\{name: color_jitter\}\]`"):
        step([FakeRun(model)], {"r": Batch(x, y)})
    with pytest.raises(ConfigError, match="takes 1 or 2 extra views, the run has 3"):
        step([FakeRun(model)], {"r": Batch(x, y, (x, x, x))})
    with pytest.raises(ConfigError, match="does not mix"):
        step([FakeRun(model, mixer=object())], {"r": Batch(x, y, (x,))})
    plain = ibcore.build("backbone", "resnet32", {}, context=context())
    with pytest.raises(ConfigError, match=r"needs a backbone with BCL's .*\(bcl_resnet32\); CifarResNet has none"):
        step([FakeRun(plain)], {"r": Batch(x, y, (x,))})
    other = ibcore.build("step", "bcl", {}, context=BuildContext(num_classes=7))
    with pytest.raises(ibcore.TrainingError, match="10 logits and 10 class centres, but the run has 7 classes"):
        other([FakeRun(model)], {"r": Batch(x, y, (x,))})
    with pytest.raises(ibcore.ContextError, match="num_classes"):
        ibcore.build("step", "bcl", {})


def test_step_params_are_validated_with_their_paths(bcl: types.SimpleNamespace) -> None:
    config = tiny_config()
    config["runs"] = [
        {"name": "a", "step": {"name": "bcl", "params": {"temperature": 0}}},
        {"name": "b", "step": {"name": "bcl", "params": {"alpha": 0, "beta": 0}}},
        {"name": "c", "step": {"name": "bcl", "params": {"lambda": 0.5}}},
        {"name": "d", "step": {"name": "bcl", "params": {"alpha": 2.0, "beta": 0.6, "temperature": 0.1}}},
    ]
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == [
        "runs[0].step.params.temperature",
        "runs[1].step.params",
        "runs[2].step.params.lambda",
    ]
    assert "no loss to train on" in issues[1].message


def test_a_run_without_a_view_is_refused_at_its_first_step(bcl: types.SimpleNamespace, tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    config["runs"] = [
        {"name": "bcl", "backbone": {"name": "bcl_resnet32", "params": {"in_channels": 1}}, "step": {"name": "bcl"}}
    ]
    trainer = make_trainer(config, tmp_path)
    with pytest.raises(ConfigError, match=r"run 'bcl': step 'bcl' contrasts two views .* add `views:"):
        trainer.fit()


def test_a_bcl_run_trains_on_its_own_next_to_fused_standard_runs(bcl: types.SimpleNamespace, tmp_path: Path) -> None:
    config = tiny_config(epochs=1, fused="on", channels_last=False)
    small = {"in_channels": 1, "hidden_dim": 32, "feat_dim": 16}
    config["runs"].append(
        {
            "name": "bcl",
            "backbone": {"name": "bcl_resnet32", "params": small},
            "loss": {"name": "logit_adjusted"},
            "step": {"name": "bcl", "params": {"alpha": 2.0, "beta": 0.6, "temperature": 0.1}},
            "views": [{"name": "standard"}],
        }
    )
    config["data"]["batch_size"] = 32
    trainer = make_trainer(config, tmp_path, smoke=2)  # two batches: the wiring, not the numbers
    trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "2 runs stacked (ce, focal)" in log
    assert "run 'bcl' trains on its own (its step 'bcl' is not 'standard')" in log
    rows = {(row["split"], row["run"]): row for row in trainer.history}
    assert {run for _, run in rows} == {"ce", "focal", "bcl"}
    train, test = rows[("train", "bcl")], rows[("test", "bcl")]
    # the step's loss (2 x logit-adjusted CE + 0.6 x BalSCL) and the evaluation: finite
    assert math.isfinite(train["train_loss"]) and train["train_loss"] > 0
    assert math.isfinite(test["acc1"])
    # a smoke evaluation sees two test batches: a shot group may have no sample (None)
    assert all(test[key] is None or math.isfinite(test[key]) for key in ("many_acc", "medium_acc", "few_acc"))
