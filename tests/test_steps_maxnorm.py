"""The `maxnorm` step (weight balancing, Alshammari et al., CVPR 2022) against the official MaxNorm_via_PGD.

The reference numbers below were produced OUTSIDE this project by the official code, ShadeAlsha/LTR-weight-balancing
@ e89f29273d35bb02d58204e7e450a390920c264d, ``utils/regularizers.py`` (``MaxNorm_via_PGD``; last changed in
11f438ae31b55b46052cf0048a52cde228b827eb), imported from a copy in /tmp, torch 2.14.1 on the CPU: the classifier
was wrapped as ``model.encoder.fc`` (the attribute the official code reads), ``setPerLayerThresh(model)`` fixed
the thresholds before anything changed (as demo2_second-stage-training.py does) and ``PGD(model)`` projected.
For the full step, the official sequence was: ``zero_grad``, cross-entropy, ``backward``, ``SGD.step()``, then
``PGD`` (the order the authors give in the repository's issue #5: PGD after every iteration), twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import make_trainer, tiny_config
from torch import nn

import ibcore
from ibcore import BuildContext, TrainingError
from ibcore.engine.checkpoint import load_checkpoint

OFFICIAL = "ShadeAlsha/LTR-weight-balancing @ e89f29273d35bb02d58204e7e450a390920c264d, utils/regularizers.py"
REPRODUCE = Path(__file__).resolve().parents[1] / "examples" / "reproduce"


def fixed_weights() -> torch.Tensor:
    """A 10 x 64 classifier whose first three rows (the 'head classes') are 5, 3 and 2 times larger."""
    torch.manual_seed(0)
    weight = torch.randn(10, 64) * 0.1
    weight[:3] *= torch.tensor([5.0, 3.0, 2.0]).unsqueeze(1)
    return weight


# Official MaxNorm_via_PGD(thresh=0.1) (LpNorm 2, tau 1) on fixed_weights(): the threshold setPerLayerThresh fixes,
# the row norms after PGD, and the first three columns of the projected weight.
OFFICIAL_THRESH_01 = 1.035275936126709
OFFICIAL_NORMS_01 = [
    1.035275936126709, 1.035275936126709, 1.035275936126709, 0.6852813363075256, 0.6859964728355408,
    0.8989353179931641, 0.9354532361030579, 0.939579427242279, 0.8463228344917297, 0.8850711584091187,
]  # fmt: skip
OFFICIAL_FIRST3_01 = [
    [-0.13924632966518402, -0.14252641797065735, -0.03099210560321808],
    [-0.0712372213602066, 0.11512766778469086, 0.1390105038881302],
    [-0.1439264714717865, -0.06825265288352966, -0.13112862408161163],
    [-0.05596300959587097, 0.053347181528806686, 0.040688659995794296],
    [-0.003937254194170237, -0.08014722168445587, -0.049554433673620224],
    [-0.0129230422899127, -0.005459475796669722, 0.04083467647433281],
    [0.02942013181746006, 0.07973223924636841, 0.12642154097557068],
    [-0.11991091817617416, -0.0025686167646199465, 0.1802375167608261],
    [-0.05460728332400322, -0.06301780790090561, -0.06346501410007477],
    [-0.08733066916465759, 0.0004261419817339629, -0.12578867375850677],
]
# Official MaxNorm_via_PGD(thresh=0.3, LpNorm=1, tau=1.5): the same, with the L1 norm and tau's double power.
OFFICIAL_THRESH_L1 = 11.06521987915039
OFFICIAL_NORMS_L1 = [
    0.18468457460403442, 0.362030029296875, 0.8070297837257385, 4.55440092086792, 4.482235431671143,
    1.2782282829284668, 1.179791808128357, 1.2052983045578003, 1.431286096572876, 1.3655126094818115,
]  # fmt: skip
OFFICIAL_FIRST3_L1 = [
    [-0.003934176173061132, -0.004026849754154682, -0.0008756310562603176],
    [-0.0040086195804178715, 0.00647839717566967, 0.007822318002581596],
    [-0.01755530573427677, -0.008325058035552502, -0.015994299203157425],
    [-0.05596300959587097, 0.053347181528806686, 0.040688659995794296],
    [-0.003937254194170237, -0.08014722168445587, -0.049554433673620224],
    [-0.002938271500170231, -0.0012413038639351726, 0.00928445253521204],
    [0.005790633615106344, 0.015693342313170433, 0.02488298900425434],
    [-0.024527931585907936, -0.000525413837749511, 0.036867816001176834],
    [-0.015219136141240597, -0.017563162371516228, -0.017687799409031868],
    [-0.022363046184182167, 0.00010912355355685577, -0.03221111372113228],
]


def assert_close(actual: torch.Tensor, expected: Any, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0.0)


class Official(nn.Module):
    """The layout the official code reads: ``model.encoder.fc``."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.fc = fc


@dataclasses.dataclass
class FakeRun:
    """A StepRun built by hand: a plain model, a loss, an optimizer, no mixer."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[..., torch.Tensor] = lambda z, y, sample_weight=None: nn.functional.cross_entropy(z, y)
    mixer: Any = None
    context: BuildContext = dataclasses.field(default_factory=BuildContext)

    def forward(self, x: torch.Tensor, layer: int = 0, mix: Any = None) -> torch.Tensor:
        return self.model(x)

    def mix_plan(self, x: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class Head(nn.Module):
    """Just the classifier: logits = classifier(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class TinyNet(nn.Module):
    """Linear features and a linear classifier, created in the order the official run created them."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize(
    ("params", "threshold", "norms", "first3", "lp_norm"),
    [
        ({"thresh": 0.1}, OFFICIAL_THRESH_01, OFFICIAL_NORMS_01, OFFICIAL_FIRST3_01, 2.0),
        ({"thresh": 0.3, "lp_norm": 1.0, "tau": 1.5}, OFFICIAL_THRESH_L1, OFFICIAL_NORMS_L1, OFFICIAL_FIRST3_L1, 1.0),
    ],
    ids=["official-cifar-default", "l1-tau1.5"],
)
def test_the_projection_is_the_official_maxnorm_via_pgd(
    params: dict[str, Any], threshold: float, norms: list[float], first3: list[list[float]], lp_norm: float
) -> None:
    """Same threshold (min + thresh * (max - min) of the row norms), same rows scaled, same numbers (official).
    The step runs whole, with a learning rate of 0 so that only the projection moves the weights."""
    weight = fixed_weights()
    original = weight.clone()
    model = Head()
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        bias = model.classifier.bias.detach().clone()
    step = ibcore.build("step", "maxnorm", params)
    run = FakeRun("wb", model, torch.optim.SGD(model.parameters(), lr=0.0))
    step([run], {"wb": ibcore.Batch(torch.randn(4, 64), torch.tensor([0, 1, 2, 3]))})
    assert_close(step.thresholds["wb"], threshold)
    projected = model.classifier.weight.detach()
    assert_close(torch.linalg.vector_norm(projected, ord=lp_norm, dim=1), norms)
    assert_close(projected[:, :3], first3)
    assert torch.equal(model.classifier.bias.detach(), bias)  # the official threshold of the bias is inf: never touched
    # each row is only rescaled: its direction is kept
    cosine = nn.functional.cosine_similarity(projected, original, dim=1)
    assert_close(cosine, [1.0] * 10)


# The official sequence on TinyNet (torch.manual_seed(0) before creating it), x = randn(12, 8) drawn right after,
# SGD(lr 0.5, momentum 0.9, weight_decay 5e-3) on every parameter, MaxNorm_via_PGD(thresh=0.1) with thresholds
# fixed before training; two iterations of (cross-entropy, backward, SGD step, PGD).
STEP_TARGETS = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4]
OFFICIAL_STEP_THRESH = 0.49053794145584106
OFFICIAL_STEP_LOSSES = [1.7798799276351929, 1.5701489448547363]
OFFICIAL_STEP_NORMS = [
    0.49053794145584106,
    0.4905379116535187,
    0.4895023703575134,
    0.49053794145584106,
    0.4438110888004303,
]
OFFICIAL_STEP_BIAS = [
    0.15652397274971008,
    0.12776747345924377,
    -0.2377701848745346,
    -0.17804668843746185,
    -0.29111409187316895,
]
OFFICIAL_STEP_WEIGHT = [
    [-0.023032961413264275, -0.07472807914018631, 0.2770964801311493, 0.06677259504795074, 0.0036604979541152716,
     -0.08792958408594131, -0.08678238093852997, -0.11234557628631592, -0.01312333159148693, 0.11121620237827301,
     0.05638699606060982, -0.16846193373203278, 0.2634921967983246, -0.06539800763130188, 0.08496591448783875,
     -0.01869438961148262],
    [-0.09478998184204102, -0.04643571749329567, -0.2101384699344635, -0.16839243471622467, -0.08395393192768097,
     -0.019464662298560143, -0.005312527064234018, 0.06197855994105339, -0.12556008994579315, 0.06089141592383385,
     0.22968937456607819, -0.006454551126807928, 0.1574127972126007, -0.0017613250529393554, -0.1480967104434967,
     0.1633666455745697],
    [-0.07135342806577682, -0.09679599851369858, 0.11400746554136276, -0.19330920279026031, -0.03870445862412453,
     -0.025749504566192627, 0.09033465385437012, 0.018022824078798294, 0.05435631796717644, 0.052050717175006866,
     0.06623731553554535, -0.10094492137432098, -0.21970757842063904, 0.18210972845554352, 0.2174830585718155,
     0.12314216792583466],
    [-0.10359311103820801, 0.019460195675492287, -0.1178731769323349, -0.08301948755979538, -0.04893885552883148,
     0.05573658272624016, -0.17183718085289001, 0.04357292875647545, 0.001013535656966269, 0.11130818724632263,
     -0.171132430434227, -0.1770392656326294, -0.14311595261096954, 0.22083638608455658, -0.09612375497817993,
     0.14245109260082245],
    [-0.012674648314714432, 0.007684805430471897, -0.08400939404964447, -0.15180432796478271, -0.031279802322387695,
     -0.10204580426216125, -0.06415850669145584, -0.013911006972193718, -0.20309850573539734, -0.16924263536930084,
     0.06382233649492264, -0.2053544521331787, -0.12943196296691895, 0.0952170342206955, -0.08769086003303528,
     -0.03606151044368744],
]  # fmt: skip
OFFICIAL_STEP_FEATURE_SUMS = (-1.9079780322499573, 0.3395133400335908)  # sum of the first layer's weight, bias


def test_one_step_is_the_official_sgd_step_then_pgd() -> None:
    """The standard step (loss, backward, optimizer step), then the projection, with the threshold fixed before the
    first step and kept for the next one: the official sequence, to 1e-6."""
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(12, 8)
    y = torch.tensor(STEP_TARGETS)
    run = FakeRun("wb", model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-3))
    step = ibcore.build("step", "maxnorm", {"thresh": 0.1})
    assert not getattr(step, "fusable", False)  # never stacked with standard runs
    batches = {"wb": ibcore.Batch(x, y)}
    losses = [step([run], batches)["wb"] for _ in range(2)]
    assert_close(torch.stack(losses), OFFICIAL_STEP_LOSSES)
    assert_close(step.thresholds["wb"], OFFICIAL_STEP_THRESH)
    assert_close(model.classifier.weight.detach(), OFFICIAL_STEP_WEIGHT)
    assert_close(model.classifier.bias.detach(), OFFICIAL_STEP_BIAS)
    assert_close(torch.linalg.vector_norm(model.classifier.weight.detach(), dim=1), OFFICIAL_STEP_NORMS)
    first = model.features[0]
    sums = (first.weight.detach().double().sum(), first.bias.detach().double().sum())
    assert_close(torch.stack(sums), list(OFFICIAL_STEP_FEATURE_SUMS), atol=1e-5)  # 128 + 16 summed values


def test_a_new_optimizer_fixes_a_new_relative_threshold_and_absolute_is_the_radius() -> None:
    """A stage that brings a new optimizer (weight balancing's classifier stage) fixes the threshold from the
    weights it starts with; ``thresh_mode: absolute`` caps every row at ``thresh`` itself."""
    from ib_plugins_builtin.steps.maxnorm import relative_threshold

    torch.manual_seed(0)
    model = TinyNet()
    batches = {"wb": ibcore.Batch(torch.randn(12, 8), torch.tensor(STEP_TARGETS))}
    run = FakeRun("wb", model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    step = ibcore.build("step", "maxnorm", {"thresh": 0.5})
    step([run], batches)
    first = step.thresholds["wb"]
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    step([run], batches)
    assert step.thresholds["wb"] is first  # the same optimizer: the threshold stays
    run.optimizer = torch.optim.SGD(model.classifier.parameters(), lr=0.5)
    expected = relative_threshold(model.classifier.weight, 0.5, 2.0)
    step([run], batches)
    assert_close(step.thresholds["wb"], float(expected))
    assert float(step.thresholds["wb"]) > float(first)
    norms = torch.linalg.vector_norm(model.classifier.weight.detach(), dim=1)
    assert float(norms.max()) <= float(step.thresholds["wb"]) + 1e-6

    absolute = ibcore.build("step", "maxnorm", {"thresh_mode": "absolute", "thresh": 0.05})
    absolute([run], batches)
    norms = torch.linalg.vector_norm(model.classifier.weight.detach(), dim=1)
    assert_close(norms, [0.05] * 5)


def test_a_classifier_without_a_weight_matrix_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(8, 5))
    model.classifier = nn.Identity()
    run = FakeRun("wb", model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = ibcore.build("step", "maxnorm")
    with pytest.raises(TrainingError, match="run 'wb': the step 'maxnorm' projects the rows of the classifier"):
        step([run], {"wb": ibcore.Batch(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))})


def classifier_norms(trainer: Any, run: str) -> torch.Tensor:
    model = next(r.model for r in trainer.runs if r.name == run)
    return torch.linalg.vector_norm(model.classifier.weight.detach(), dim=1)


def step_of(trainer: Any, run: str) -> Any:
    return next(r.step for r in trainer.runs if r.name == run)


def test_a_maxnorm_run_trains_alone_next_to_fused_standard_runs(tmp_path: Path) -> None:
    """End to end on the fused path: the standard runs stay stacked, the maxnorm runs train one by one, and every
    classifier row of theirs ends inside its ball (relative: the official rule; absolute: the radius)."""
    config = tiny_config(epochs=1, channels_last=False, fused="on")
    config["runs"] += [
        {"name": "wb", "step": {"name": "maxnorm", "params": {"thresh": 0.1}}},
        {"name": "capped", "step": {"name": "maxnorm", "params": {"thresh_mode": "absolute", "thresh": 0.3}}},
    ]
    trainer = make_trainer(config, tmp_path)
    results = trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "2 runs stacked (ce, focal)" in log
    assert "fused path: run 'wb' trains on its own (its step 'maxnorm' is not 'standard')" in log
    assert "fused path: run 'capped' trains on its own (its step 'maxnorm' is not 'standard')" in log
    assert json.loads((trainer.run_dir / "meta.json").read_text())["fused_groups"] == [["ce", "focal"]]
    threshold = float(step_of(trainer, "wb").thresholds["wb"])
    assert float(classifier_norms(trainer, "wb").max()) <= threshold + 1e-6
    assert float(classifier_norms(trainer, "capped").max()) <= 0.3 + 1e-6
    # the projection mattered: the same model without it (ce: same initial weights and batches) grew past both
    assert float(classifier_norms(trainer, "ce").max()) > max(threshold, 0.3)
    assert {row["run"]: row["status"] for row in results.rows} == dict.fromkeys(["ce", "focal", "wb", "capped"], "ok")


def test_in_a_classifier_stage_the_threshold_comes_from_the_weights_the_stage_starts_with(tmp_path: Path) -> None:
    """Weight balancing's second stage: backbone frozen, the trained classifier fine-tuned by a new optimizer with
    weight decay and MaxNorm; the relative threshold is fixed from the classifier the first stage left."""
    from ib_plugins_builtin.steps.maxnorm import relative_threshold

    config = tiny_config(epochs=2, channels_last=False, fused="off")
    stage = {
        "from_epoch": 1,
        "train_classifier": True,
        "batchnorm": "update",
        "step": {"name": "maxnorm", "params": {"thresh": 0.1}},
        "optimizer": {
            "name": "sgd",
            "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, "schedule": "cosine"},
        },
    }
    config["runs"] = [{"name": "wb", "stages": [stage]}]
    trainer = make_trainer(config, tmp_path)
    trainer.fit()
    after_stage_1 = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch-0001.pt")["runs"]["wb"]["model"]
    final = load_checkpoint(trainer.run_dir / "checkpoints" / "epoch-0002.pt")["runs"]["wb"]["model"]
    expected = relative_threshold(after_stage_1["classifier.weight"], 0.1, 2.0)
    threshold = step_of(trainer, "wb").thresholds["wb"]
    assert_close(threshold, float(expected))
    assert float(classifier_norms(trainer, "wb").max()) <= float(threshold) + 1e-6
    for key, value in after_stage_1.items():  # only the classifier learnt in the stage (BatchNorm stats may move)
        if key.startswith("classifier."):
            assert not torch.equal(value, final[key]), key
        elif not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, final[key]), key


@pytest.mark.parametrize(
    ("params", "path", "message"),
    [
        ({"thresh": 1.5}, "params.thresh", "a relative thresh is a fraction"),
        ({"thresh_mode": "absolute", "thresh": 0.0}, "params.thresh", "must be > 0"),
        ({"thresh": -0.1}, "params.thresh", "greater than or equal to 0"),
        ({"lp_norm": 0.5}, "params.lp_norm", "greater than or equal to 1"),
        ({"tau": 0.0}, "params.tau", "greater than 0"),
        ({"thresh_mode": "percent"}, "params.thresh_mode", "'relative' or 'absolute'"),
        ({"threshold": 0.1}, "params.threshold", "thresh"),
    ],
)
def test_params_are_validated_with_their_path(params: dict[str, Any], path: str, message: str) -> None:
    config = tiny_config()
    config["runs"][0]["step"] = {"name": "maxnorm", "params": params}
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == [f"runs[0].step.{path}"], issues
    assert message in issues[0].message


def test_the_defaults_are_the_official_cifar_lt_second_stage() -> None:
    from ib_plugins_builtin.steps.maxnorm import MaxNormParams

    assert MaxNormParams().model_dump() == {"thresh_mode": "relative", "thresh": 0.1, "lp_norm": 2.0, "tau": 1.0}


def test_ib_list_steps_shows_maxnorm_with_its_paper(ib_cli: Any) -> None:
    result = ib_cli("list", "steps", "--citations")
    assert result.rc == 0, result.output
    line = result.line_with("maxnorm")
    assert "ibcore" in line and "Weight balancing's MaxNorm" in line and "Alshammari" in line


# ---- the recipe: examples/reproduce/weight_balancing.yaml ------------------------------------------------------


def test_the_recipe_is_the_paper_two_stage_protocol() -> None:
    experiment = ibcore.load_experiment(REPRODUCE / "weight_balancing.yaml")
    assert experiment.trainer.epochs == 200 and experiment.data.batch_size == 64
    assert {run.name for run in experiment.runs} == {"wd", "weight_balancing"}
    for run in experiment.runs:
        assert run.backbone is not None and run.backbone.name == "torchvision"
        assert run.backbone.params == {"arch": "resnet34", "cifar_stem": True}
        assert run.loss is not None and run.loss.name == "cross_entropy" and not run.loss.params
        sgd = run.optimizer.params if run.optimizer is not None else {}
        assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"], sgd["schedule"]) == (0.01, 0.9, 5e-3, "cosine")
        assert run.step is None  # stage 1 is the standard step: the two runs train fused until the stage
        assert run.reference is not None and run.reference["source"] and 0 < run.reference["acc1"] < 100
    (stage,) = experiment.run("weight_balancing").stages
    assert stage.from_epoch == 190 and stage.train_classifier and stage.batchnorm == "update"
    assert stage.step is not None and stage.step.name == "maxnorm" and stage.step.params == {"thresh": 0.1}
    assert stage.optimizer is not None and stage.optimizer.params["weight_decay"] == 0.1
    assert stage.loss is not None and stage.loss.params["class_weights"] == {"name": "effective_number", "beta": 0.9999}
    assert experiment.run("weight_balancing").reference["acc1"] == 53.35


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Iterator[Path]:
    from test_reproduce import write_tiny_cifar_npz

    path = tmp_path / "cifar_tiny.npz"
    write_tiny_cifar_npz(path)
    yield path


def test_the_recipe_runs_end_to_end_on_the_cpu(tmp_path: Path, tiny_cifar: Path, ib_cli: Any) -> None:
    """`ib run weight_balancing.yaml --smoke 1` on a tiny array file: both runs, both stages, the maxnorm stage."""
    dataset = "{name: array_file, params: {path: %s, mean: [0.4914, 0.4822, 0.4465], std: [0.2023, 0.1994, 0.2010]}}"
    result = ib_cli(
        "run", str(REPRODUCE / "weight_balancing.yaml"), "--smoke", "1", "--out", str(tmp_path / "runs"),
        "--set", f"data.dataset={dataset % tiny_cifar}", "--set", "seeds=[0]", "--set", "data.batch_size=4",
        "--set", "trainer.device=cpu",
    )  # fmt: skip
    assert result.rc == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    payload = json.loads((run_dir / "results.json").read_text())
    assert {row["status"] for row in payload["last"]} == {"ok"}
    summary = {row["run"]: row for row in payload["summary"]}
    assert set(summary) == {"wd", "weight_balancing"}
    assert all(row["reference"]["source"] and "acc1" in row["difference"] for row in summary.values())
    log = (run_dir / "train.log").read_text()
    assert "smoke run: epochs 1, 191, 200 of 200" in log
