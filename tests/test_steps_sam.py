"""The ``sam`` and ``imbsam`` steps reproduce their reference code, share one mixer plan between their two
passes, leave BatchNorm statistics to the first pass, and train next to fused runs.

Reference numbers: the official code run outside this project on the problem of :func:`fixed_model`,
:data:`X` and :data:`Y` in float64 (3 steps, SGD lr 0.1, momentum 0.9, weight decay 5e-4):

- SAM: github.com/davda54/sam at 3c3afdbd71cff2462ec91c734b3d1170bd0f3707 — ``sam.py`` (``SAM`` wrapping
  ``torch.optim.SGD``) driven as ``example/train.py`` does (``enable_running_stats`` / first pass /
  ``first_step(zero_grad=True)`` / ``disable_running_stats`` / second pass / ``second_step(zero_grad=True)``
  from ``example/utility/bypass_bn.py``), loss ``F.cross_entropy``.
- ImbSAM: github.com/cool-xuan/Imbalanced_SAM at c65f41eb6ea54d06846180e2eff70abdfed886db — ``imbsam.py``
  (``ImbSAM``) driven by ``forbackward(optim_mode='imbsam')`` of ``utils/trainval.py`` copied verbatim,
  ``nn.CrossEntropyLoss(reduction='none')``, tail classes ``count < eta`` with eta 20 for counts (100, 30, 5)
  as ``scripts/train.py`` builds them; once unmodified, once with davda54's BatchNorm bypass around the
  perturbed forward (the running statistics below).

PyTorch 2.14.1 (CPU). The reference numbers are printed with 15 significant digits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_engine import make_trainer, state_of, tiny_config
from torch import nn

import ibcore
from ib_plugins_builtin.steps.sam import ImbSAMStep, SAMStep, masked_loss, running_stats_frozen
from ibcore import BuildContext, BuildError, ConfigError
from ibcore.engine.mixing import loss_of
from ibcore.protocols import Batch, MixPlan, StepRun

COUNTS = (100, 30, 5)  # with tail_threshold 20, class 2 is the tail
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def fixed_model() -> nn.Sequential:
    """The reference problem's model: weights from a formula, so no RNG (and no torch version) is involved."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(0.6 * torch.sin(1.3 * torch.arange(p.numel(), dtype=torch.float64) + k).reshape(p.shape))
    return model


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Three fixed batches of 8 samples with 3 features, and their labels."""
    x = torch.stack(
        [torch.cos(0.7 * torch.arange(24, dtype=torch.float64) * (s + 1) + s).reshape(8, 3) * 2 for s in range(3)]
    )
    y = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 0], [2, 0, 1, 0, 2, 0, 1, 1], [0, 0, 1, 2, 0, 1, 0, 0]])
    return x.to(torch.get_default_dtype()), y


# --- reference numbers (see the module docstring) ---------------------------------------------------

# fmt: off
DAVDA54_SAM_RHO_005 = {
    "losses": [1.30711222805692, 1.24294809133027, 1.37442758545588],
    "0.weight": [
        -0.00958837862375661, 0.577683586485657, 0.31125757200265,
        -0.412543949417659, -0.529924114374342, 0.129035789707542,
        0.602146980408331, 0.19410808194038, -0.491974913120603,
        -0.458937910488707, 0.24812190483763, 0.592115442331767,
    ],
    "0.bias": [0.504740977376522, 0.447297630487844, -0.26543779297242, -0.58930622787348],
    "1.weight": [0.457316189774015, -0.0946208690213818, -0.629512781063949, -0.273845200008594],
    "1.bias": [-0.0190668769342578, -0.549545377918844, -0.356238454610686, 0.465133810533335],
    "1.running_mean": [0.12778093275736, 0.22291649469221, -0.209069045875053, -0.0617930728023129],
    "1.running_var": [0.981002157442316, 0.989600758068294, 1.03795310840399, 1.03403360991986],
    "3.weight": [
        -0.395512137357113, -0.499220400716078, 0.199023142265173, 0.665858539537501,
        0.124757858096955, -0.527669409520342, -0.405066809829255, 0.290401224631188,
        0.529728736857273, 0.00477657012506449, -0.59975897893597, -0.365249052140047,
    ],
    "3.bias": [-0.406973829943297, -0.00188709270388391, 0.424342157839796],
}
DAVDA54_ASAM_RHO_05 = {
    "losses": [1.30711222805692, 1.23947425824467, 1.35648823728159],
    "0.weight": [
        -0.00853837681714709, 0.579034667426396, 0.309611341957271,
        -0.412543949417659, -0.529924114374342, 0.129035789707542,
        0.601409810639583, 0.193005448712766, -0.493306920984275,
        -0.458852819746882, 0.247974086992557, 0.592241963415631,
    ],
    "0.bias": [0.504740977376522, 0.447297630487844, -0.265437792972417, -0.58930622787348],
    "1.weight": [0.439279805850815, -0.0946208690213818, -0.632738966206942, -0.276286613504292],
    "1.bias": [-0.0416583799934858, -0.549545377918844, -0.35393676580563, 0.469994293245261],
    "1.running_mean": [0.127565824860366, 0.22291649469221, -0.209114032519822, -0.0617774749642793],
    "1.running_var": [0.981098025916154, 0.989600758068294, 1.03799999925302, 1.03402791378024],
    "3.weight": [
        -0.385787692595945, -0.499220400716078, 0.196255355545382, 0.666901467378111,
        0.12841470951666, -0.527669409520342, -0.40418170852168, 0.294178429164343,
        0.5163474406764, 0.00477657012506449, -0.597876293523755, -0.370069184513812,
    ],
    "3.bias": [-0.386279324721922, 0.00796958750568213, 0.393790972408855],
}
# Parameters: the official code as published. Running statistics: the official code with davda54's bypass
# around its perturbed forward (what this project does); unmodified, it updates them in both forwards:
OFFICIAL_IMBSAM = {
    "losses": [1.30711222805692, 1.25269192342314, 1.41142935133502],  # mean loss of the forward at w
    "0.weight": [
        -0.0084136263153032, 0.578377713789875, 0.309246184008476,
        -0.412543949417659, -0.529924114374342, 0.129035789707542,
        0.605081879250186, 0.199557240003791, -0.48649930546478,
        -0.4516365910367, 0.257489460233194, 0.593879547336372,
    ],
    "0.bias": [0.504740977376522, 0.447297630487844, -0.26543779297242, -0.58930622787348],
    "1.weight": [0.482219660123445, -0.0946208690213818, -0.619240401525237, -0.214581078321001],
    "1.bias": [0.0115983395796803, -0.549545377918844, -0.363451558243671, 0.453840638425284],
    "1.running_mean": [0.127536608213852, 0.22291649469221, -0.208907983783121, -0.0625680783750188],
    "1.running_var": [0.981038965909755, 0.989600758068294, 1.03779570491604, 1.03394449057655],
    "3.weight": [
        -0.405345203273773, -0.499220400716078, 0.195910707392376, 0.658476189585159,
        0.1110038654146, -0.527669409520342, -0.410237107262705, 0.273840249887819,
        0.553315795456288, 0.00477657012506449, -0.591476246629724, -0.341305727444337,
    ],
    "3.bias": [-0.435624153177368, -0.044479746271445, 0.495585134641427],
}
OFFICIAL_IMBSAM_RUNNING_MEAN_UNBYPASSED = [
    0.222233426315888, 0.406986299172681, -0.394010055368437, -0.0820976724419143,
]
OFFICIAL_IMBSAM_LOGGED = [1.47464777738512, 1.4586040934012, 1.52570216229609]  # head(w) + 2 tail(w + e)
# fmt: on


# --- a StepRun of our own -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class TinyRun:
    """A StepRun stand-in: a model, the built-in cross-entropy, SGD, an optional mixer; no engine."""

    name: str
    model: nn.Module
    loss: Any
    optimizer: torch.optim.Optimizer
    context: BuildContext
    mixer: Any = None
    plans_drawn: int = 0
    epoch: int = 0

    def forward(
        self, x: torch.Tensor, layer: int = 0, mix: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Any:
        if layer == 0:
            return self.model(x)
        assert mix is not None
        return self.model[layer:](mix(self.model[:layer](x)))

    def mix_plan(self, x: torch.Tensor, y: torch.Tensor) -> MixPlan | None:
        if self.mixer is None:
            return None
        self.plans_drawn += 1
        return self.mixer.plan(x, y, None)  # type: ignore[no-any-return]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


def tiny_run(name: str = "r", mixer: Any = None, model: nn.Module | None = None) -> TinyRun:
    model = fixed_model() if model is None else model
    context = BuildContext(num_classes=3, class_counts=COUNTS)
    loss = ibcore.build("loss", "cross_entropy", context=context)
    run = TinyRun(name, model, loss, torch.optim.SGD(model.parameters(), **SGD), context, mixer)
    model.train()
    return run


def train(step: Any, run: TinyRun, steps: int = 3) -> list[float]:
    x, y = batches()
    return [step([run], {run.name: Batch(x[s], y[s])})[run.name].item() for s in range(steps)]


def assert_matches(run: TinyRun, losses: list[float], reference: dict[str, list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), atol=1e-9, rtol=1e-9)
    state = run.model.state_dict()
    for key, values in reference.items():
        if key != "losses":
            expected = torch.tensor(values).reshape(state[key].shape)
            torch.testing.assert_close(state[key], expected, atol=1e-9, rtol=1e-9, msg=key)


def test_the_stand_in_offers_every_member_of_the_step_run_protocol() -> None:
    members = set(StepRun.__annotations__) | {"forward", "mix_plan", "autocast"}
    expected = {"name", "model", "loss", "optimizer", "mixer", "context", "epoch", "forward", "mix_plan", "autocast"}
    assert members == expected
    assert all(hasattr(tiny_run(), member) for member in members)


# --- reproduction of the reference code -----------------------------------------------------------


def test_sam_reproduces_davda54(float64: None) -> None:
    run = tiny_run()
    losses = train(ibcore.build("step", "sam", {"rho": 0.05}), run)
    assert_matches(run, losses, DAVDA54_SAM_RHO_005)
    # davda54's bypass sets the momentum to 0, yet counts the second pass; ours counts optimisation steps
    assert run.model.state_dict()["1.num_batches_tracked"].item() == 3


def test_adaptive_sam_reproduces_davda54_asam(float64: None) -> None:
    run = tiny_run()
    losses = train(ibcore.build("step", "sam", {"rho": 0.5, "adaptive": True}), run)
    assert_matches(run, losses, DAVDA54_ASAM_RHO_05)


def test_imbsam_reproduces_the_official_code(float64: None) -> None:
    step = ibcore.build("step", "imbsam", context=BuildContext(num_classes=3, class_counts=COUNTS))
    assert (step.rho, step.tail_threshold, step.tail_weight) == (0.05, 20, 2.0)  # the official defaults
    run = tiny_run()
    losses = train(step, run)
    assert_matches(run, losses, OFFICIAL_IMBSAM)
    # we return the run's loss at w; the official script logs head(w) + 2 tail(w + e); unmodified, it also
    # lets the perturbed forward move the running statistics
    assert not torch.allclose(torch.tensor(losses), torch.tensor(OFFICIAL_IMBSAM_LOGGED))
    running_mean = run.model.state_dict()["1.running_mean"]
    assert not torch.allclose(running_mean, torch.tensor(OFFICIAL_IMBSAM_RUNNING_MEAN_UNBYPASSED))


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [("sam", {}, DAVDA54_SAM_RHO_005), ("sam", {"rho": 0.5, "adaptive": True}, DAVDA54_ASAM_RHO_05),
     ("imbsam", {}, OFFICIAL_IMBSAM)],
)  # fmt: skip
def test_in_float32_the_steps_stay_within_1e_5_of_the_float64_references(
    name: str, params: dict[str, Any], reference: dict[str, list[float]]
) -> None:
    run = tiny_run(model=fixed_model().float())
    losses = train(ibcore.build("step", name, params, context=run.context), run)
    state = run.model.state_dict()
    assert max(abs(a - b) for a, b in zip(losses, reference["losses"], strict=True)) < 1e-5
    for key, values in reference.items():
        if key != "losses":
            assert (state[key].flatten().double() - torch.tensor(values, dtype=torch.float64)).abs().max() < 1e-5, key


def test_imbsam_differs_from_sam_and_from_the_standard_step(float64: None) -> None:
    """On the same problem the three steps reach three different weights (the test above is not vacuous)."""
    imbsam = tiny_run()
    train(ImbSAMStep(), imbsam)
    sam = tiny_run()
    train(SAMStep(), sam)
    plain = tiny_run()
    train(ibcore.build("step", "standard"), plain)
    weights = [run.model[3].weight.detach() for run in (imbsam, sam, plain)]
    assert (weights[0] - weights[1]).abs().max() > 1e-3 and (weights[0] - weights[2]).abs().max() > 1e-3


def test_a_batch_without_tail_samples_is_one_step_on_the_head_loss(float64: None) -> None:
    x, y = batches()
    head_only = y[2].clone()
    head_only[head_only == 2] = 0
    run, plain = tiny_run(), tiny_run()
    ImbSAMStep()([run], {"r": Batch(x[2], head_only)})
    ibcore.build("step", "standard")([plain], {"r": Batch(x[2], head_only)})
    for key, value in plain.model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[key], value, atol=1e-12, rtol=0, msg=key)


# --- one mixer plan, BatchNorm statistics from the first pass -------------------------------------


class RecordingMixer:
    """Input mixup with a fixed pairing; records every plan its ``mix`` receives."""

    def __init__(self) -> None:
        self.mixed_with: list[MixPlan] = []

    def active(self, epoch: int) -> bool:
        return True

    def plan(self, x: torch.Tensor, targets: torch.Tensor, generator: Any) -> MixPlan:
        permutation = torch.arange(len(targets)).flip(0)
        return MixPlan(permutation, 0.7, torch.full((len(targets),), 0.7, dtype=x.dtype), layer=1)

    def mix(self, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        self.mixed_with.append(plan)
        return plan.lam * x + (1 - plan.lam) * x[plan.permutation]


@pytest.mark.parametrize("name", ["sam", "imbsam"])
def test_both_passes_use_one_draw_of_the_mixer_plan(name: str, float64: None) -> None:
    mixer = RecordingMixer()
    run = tiny_run(mixer=mixer)
    step = ibcore.build("step", name, context=run.context)
    train(step, run, steps=2)
    assert run.plans_drawn == 2  # one per batch
    first, second, third, fourth = mixer.mixed_with  # two passes a batch, each with its batch's plan
    assert first is second and third is fourth and first is not third


def test_the_head_and_tail_parts_of_a_mixed_loss_add_up_to_the_mixed_loss(float64: None) -> None:
    run = tiny_run()
    x, y = batches()
    plan = RecordingMixer().plan(x[0], y[0], None)
    logits = run.model(x[0])
    tail = torch.tensor([False, False, True])
    both = masked_loss(run.loss, logits, y[0], plan, tail) + masked_loss(run.loss, logits, y[0], plan, ~tail)
    torch.testing.assert_close(both, loss_of(run.loss, logits, y[0], plan), atol=1e-14, rtol=0)
    torch.testing.assert_close(masked_loss(run.loss, logits, y[0], None, torch.ones(3, dtype=torch.bool)),
                               F.cross_entropy(logits, y[0]), atol=1e-14, rtol=0)  # fmt: skip


@pytest.mark.parametrize("name", ["sam", "imbsam"])
def test_batchnorm_statistics_move_with_the_first_pass_only(name: str, float64: None) -> None:
    """Also for a cumulative-average BatchNorm (momentum None), which davda54's momentum-0 bypass mis-counts."""
    model = fixed_model()
    model[1].momentum = None
    run = tiny_run(model=model)
    x, y = batches()
    expected = model[0](x[0]).detach()
    ibcore.build("step", name, context=run.context)([run], {"r": Batch(x[0], y[0])})
    torch.testing.assert_close(model[1].running_mean, expected.mean(0), atol=1e-14, rtol=0)
    torch.testing.assert_close(model[1].running_var, expected.var(0, unbiased=True), atol=1e-14, rtol=0)
    assert model[1].num_batches_tracked.item() == 1


def test_running_stats_frozen_restores_the_statistics_even_when_the_pass_fails() -> None:
    model = fixed_model().float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), running_stats_frozen(model):
        model(torch.full((4, 3), float("nan")))
        raise RuntimeError("boom")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- params, listing, training through the engine -------------------------------------------------


def test_params_are_validated_with_their_path() -> None:
    config = tiny_config()
    config["runs"][0]["step"] = {"name": "sam", "params": {"rho": 0.0}}
    config["runs"][1]["step"] = {"name": "imbsam", "params": {"rho": -0.1, "tail_threshold": 0}}
    issues = ibcore.validate(config)
    assert [issue.path for issue in issues] == [
        "runs[0].step.params.rho",
        "runs[1].step.params.rho",
        "runs[1].step.params.tail_threshold",
    ]
    assert "greater than 0" in issues[0].message and "greater than or equal to 1" in issues[2].message
    with pytest.raises(ConfigError, match="rho"):
        ibcore.build("step", "sam", {"rho": -1})
    with pytest.raises(ConfigError, match="adaptive"):
        ibcore.build("step", "sam", {"adaptiv": True})


def test_imbsam_without_a_tail_class_is_refused_when_built() -> None:
    context = BuildContext(num_classes=3, class_counts=COUNTS)
    with pytest.raises(BuildError, match=r"tail_threshold=5 makes no class a tail class \(the smallest class has 5"):
        ibcore.build("step", "imbsam", {"tail_threshold": 5}, context=context)
    assert ibcore.build("step", "imbsam", {"tail_threshold": 6}, context=context).tail_threshold == 6


def test_the_steps_are_listed_with_their_papers(ib_cli: Callable[..., Any]) -> None:
    listed = ib_cli("list", "steps", "--citations")
    assert listed.rc == 0
    assert "Foret et al., ICLR 2021" in listed.line_with("Sharpness-Aware Minimization: the gradient at w")
    assert "Zhou et al., ICCV 2023" in listed.line_with("ImbSAM: head-class loss at w")


def test_sam_and_imbsam_runs_train_on_their_own_next_to_fused_runs(tmp_path: Path) -> None:
    config = tiny_config(epochs=1, channels_last=False, fused="on")
    config["runs"] += [
        {"name": "sam", "step": {"name": "sam", "params": {"rho": 0.05}}},
        {"name": "imbsam", "step": {"name": "imbsam"}},  # MNIST-LT IR 100: classes 7-9 have < 20 images
    ]
    trainer = make_trainer(config, tmp_path)
    results = trainer.fit()
    log = (trainer.run_dir / "train.log").read_text()
    assert "2 runs stacked (ce, focal)" in log
    assert "run 'sam' trains on its own (its step 'sam' is not 'standard')" in log
    assert "run 'imbsam' trains on its own (its step 'imbsam' is not 'standard')" in log
    status = {row["run"]: row["status"] for row in results.rows}
    assert status == {"ce": "ok", "focal": "ok", "sam": "ok", "imbsam": "ok"}
    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = {line["run"]: line["train_loss"] for line in lines if line["split"] == "train"}
    assert all(math.isfinite(train_losses[run]) for run in ("sam", "imbsam"))
    assert all(math.isfinite(results.row(run)["acc1"]) for run in ("sam", "imbsam"))
    # same initial weights, batches and loss as 'ce': only the step differs, and it made a difference
    weights = {run: state_of(trainer, run)["classifier.weight"] for run in ("ce", "sam", "imbsam")}
    assert not torch.allclose(weights["sam"], weights["ce"]) and not torch.allclose(weights["imbsam"], weights["sam"])


# --- the documentation page -------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "components" / "step_sam.md"


def _block(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert found is not None, language
    return found.group(1)


def test_the_documented_config_validates() -> None:
    assert ibcore.validate(yaml.safe_load(_block("yaml"))) == []


def test_the_documented_step_plugin_is_imbsam_with_tail_weight_1(float64: None) -> None:
    """The page's own-step example (under 40 lines) takes the built-in step's weights (BatchNorm statistics
    apart: the example lets both passes move them)."""
    code = _block("python")
    assert len(code.strip().splitlines()) < 40
    with ibcore.registry_snapshot():
        exec(compile(code, str(DOCS), "exec"), {"__name__": "my_lab.steps"})
        example, builtin = tiny_run(), tiny_run()
        train(ibcore.build("step", "tail_sam", context=example.context), example)
        listed = {info.name: info for info in ibcore.list_components("steps")}
        assert listed["tail_sam"].description.startswith("ImbSAM in short")
    train(ibcore.build("step", "imbsam", {"tail_weight": 1.0}, context=builtin.context), builtin)
    for (key, ours), theirs in zip(builtin.model.named_parameters(), example.model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0, msg=key)


# --- data_parallel --------------------------------------------------------------------------------


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    """Two gloo processes, each its half of every batch, SAM and ImbSAM through a DDP forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, y = batches()
        states = {}
        for name in ("sam", "imbsam"):
            model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))  # no BatchNorm: ranks see halves
            with torch.no_grad():
                for k, p in enumerate(model.parameters()):
                    p.copy_(0.6 * torch.sin(1.3 * torch.arange(p.numel(), dtype=torch.float64) + k).reshape(p.shape))
            run = tiny_run(name, model=model)
            wrapper = DistributedDataParallel(model)
            run.forward = lambda x, layer=0, mix=None, w=wrapper: w(x)  # type: ignore[method-assign]
            step = ibcore.build("step", name, context=run.context)
            half = slice(4 * rank, 4 * rank + 4)
            for s in range(3):
                step([run], {name: Batch(x[s][half], y[s][half])})
            states[name] = [p.detach().tolist() for p in model.parameters()]
            del run, wrapper, step  # the DDP reducer goes before the process group (gloo aborts otherwise, at times)
            gc.collect()
        Path(out, f"rank{rank}.json").write_text(json.dumps(states))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_under_data_parallel_the_ranks_stay_identical_and_sam_is_the_full_batch_sam(
    tmp_path: Path, float64: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAM's two backward passes are averaged by DDP: two ranks on halves take the single-process full-batch
    step. ImbSAM's tail ascent is per rank (its gradient at w never goes through DDP), its update is averaged."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for k, p in enumerate(model.parameters()):
            p.copy_(0.6 * torch.sin(1.3 * torch.arange(p.numel(), dtype=torch.float64) + k).reshape(p.shape))
    run = tiny_run(model=model)
    train(SAMStep(), run)
    for ours, theirs in zip(model.parameters(), ranks[0]["sam"], strict=True):
        torch.testing.assert_close(ours.detach(), torch.tensor(theirs), atol=1e-12, rtol=1e-12)
