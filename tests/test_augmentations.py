"""Augmentation policies as a kind, in the engine: the default is today's augmentation; runs with other policies
train in the same experiment on the same crop and flip; equal policies share one batch; views reach the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import make_trainer, state_of, tiny_config

import ibcore
from ibcore.engine.steps.standard import StandardStep
from ibcore.errors import ConfigError


class Invert:
    """255 - pixels: deterministic, so the test can recompute it from the standard run's batch."""

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, images: torch.Tensor, draws: Any) -> torch.Tensor:
        assert images.dtype == torch.uint8
        return 255 - images


class Noise:
    """Adds a per-sample random offset drawn from the policy's stream (to see per-sample draws)."""

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"offset": torch.randint(0, 50, (n,), generator=generator)}

    def apply(self, images: torch.Tensor, draws: Any) -> torch.Tensor:
        offset = draws["offset"].to(images.device).view(-1, 1, 1, 1).to(torch.int16)
        return (images.to(torch.int16) + offset).clamp(0, 255).to(torch.uint8)


class Blank:
    """Works on the normalised batch (like Cutout): sets it to zero."""

    normalised = True

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor, draws: Any) -> torch.Tensor:
        assert x.is_floating_point()
        return torch.zeros_like(x)


def register_test_policies() -> None:
    ibcore.register_augmentation("ibtest_invert")(lambda params, context: Invert())
    ibcore.register_augmentation("ibtest_noise")(lambda params, context: Noise())
    ibcore.register_augmentation("ibtest_blank")(lambda params, context: Blank())


class BatchRecorder(StandardStep):
    """The standard step, keeping every Batch each run trained on."""

    def __init__(self) -> None:
        self.batches: dict[str, list[ibcore.Batch]] = {}

    def __call__(self, runs: Any, batches: Any) -> dict[str, torch.Tensor]:
        for run in runs:
            self.batches.setdefault(run.name, []).append(batches[run.name])
        return super().__call__(runs, batches)


def recorded(config: dict[str, Any], tmp_path: Path, name: str = "run") -> tuple[Any, BatchRecorder]:
    """Train ``config`` with every run on a recording step (inside registry_snapshot)."""
    step = BatchRecorder()
    ibcore.register_step("ibtest_recording", replace=True)(lambda params, context: step)
    config = {**config, "defaults": {**config["defaults"], "step": {"name": "ibtest_recording"}}}
    trainer = make_trainer(config, tmp_path, name)
    trainer.fit()
    return trainer, step


def test_standard_is_the_default_bit_for_bit(tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    explicit = tiny_config(epochs=1)
    explicit["defaults"]["augmentation"] = {"name": "standard"}
    a, b = make_trainer(config, tmp_path, "a"), make_trainer(explicit, tmp_path, "b")
    a.fit()
    b.fit()
    for run in ("ce", "focal"):
        for key, value in state_of(a, run).items():
            assert torch.equal(value, state_of(b, run)[key]), key


def test_runs_with_other_policies_share_the_crop_and_flip_and_equal_policies_share_a_batch(tmp_path: Path) -> None:
    config = tiny_config(epochs=1, channels_last=False)
    config["data"]["dataset"]["params"]["augment"] = True  # MNIST's pad-2 random crop
    config["runs"] = [
        {"name": "plain"},
        {"name": "inverted", "augmentation": {"name": "ibtest_invert"}},
        {"name": "noisy_a", "augmentation": {"name": "ibtest_noise"}},
        {"name": "noisy_b", "augmentation": {"name": "ibtest_noise"}, "views": [{"name": "ibtest_invert"}]},
    ]
    with ibcore.registry_snapshot():
        register_test_policies()
        _, step = recorded(config, tmp_path)
    seen = step.batches
    assert len(seen["plain"]) == len(seen["inverted"]) > 1
    for plain, inverted in zip(seen["plain"], seen["inverted"], strict=True):
        # one crop and flip for both: normalised p and 255 - p sum to (255 / 255 - 2 mean) / std
        assert torch.equal(plain.targets, inverted.targets)
        total = plain.inputs + inverted.inputs
        torch.testing.assert_close(total, torch.full_like(total, float(total.flatten()[0])))
    for a, b in zip(seen["noisy_a"], seen["noisy_b"], strict=True):
        assert torch.equal(a.inputs, b.inputs)  # the same policy: the same draws
        assert a.views == () and len(b.views) == 1
    first = seen["noisy_a"][0].inputs
    offsets = (first - seen["plain"][0].inputs).flatten(1)  # per sample, one offset (where not clipped)
    assert len({round(float(row.median()), 4) for row in offsets}) > 1, "every sample draws its own offset"
    for inverted, noisy_b in zip(seen["inverted"], seen["noisy_b"], strict=True):
        assert noisy_b.views[0].shape == inverted.inputs.shape
        assert not torch.equal(noisy_b.views[0], inverted.inputs)  # a view crops and flips the images anew


def test_runs_with_equal_policies_share_one_batch_object(tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    config["runs"] = [
        {"name": "a", "augmentation": {"name": "ibtest_noise"}},
        {"name": "b", "augmentation": {"name": "ibtest_noise"}},
        {"name": "c"},
    ]
    with ibcore.registry_snapshot():
        register_test_policies()
        _, step = recorded(config, tmp_path)
    seen = step.batches
    assert all(a is b for a, b in zip(seen["a"], seen["b"], strict=True))
    assert all(a is not c for a, c in zip(seen["a"], seen["c"], strict=True))


def test_runs_with_one_policy_are_stacked_on_the_fused_path(tmp_path: Path, float64: None) -> None:
    config = tiny_config(epochs=1, channels_last=False, fused="on")
    config["runs"] = [
        {"name": "ce", "augmentation": {"name": "ibtest_noise"}},
        {"name": "focal", "augmentation": {"name": "ibtest_noise"}, "loss": {"name": "focal"}},
        {"name": "plain"},
    ]
    with ibcore.registry_snapshot():
        register_test_policies()
        fused = make_trainer(config, tmp_path, "fused")
        sequential = make_trainer({**config, "trainer": {**config["trainer"], "fused": "off"}}, tmp_path, "seq")
        fused.fit()
        sequential.fit()
    assert "3 runs stacked (ce, focal, plain)" in (fused.run_dir / "train.log").read_text()
    for run in ("ce", "focal", "plain"):
        for key, value in state_of(fused, run).items():
            torch.testing.assert_close(value, state_of(sequential, run)[key], atol=1e-9, rtol=1e-9, msg=key)


def test_a_normalised_policy_applies_after_normalisation_and_order_is_checked(tmp_path: Path) -> None:
    config = tiny_config(epochs=1)
    config["runs"] = [{"name": "blank", "augmentation": {"name": "compose", "params": {"policies": [
        {"name": "ibtest_invert"}, {"name": "ibtest_blank"}]}}}]  # fmt: skip
    with ibcore.registry_snapshot():
        register_test_policies()
        _, step = recorded(config, tmp_path)
        assert all(float(b.inputs.abs().max()) == 0.0 for b in step.batches["blank"])
        wrong = {"name": "compose", "params": {"policies": [{"name": "ibtest_blank"}, {"name": "ibtest_invert"}]}}
        config["runs"][0]["augmentation"] = wrong
        with pytest.raises(ConfigError, match="put the pixel policies first"):
            make_trainer(config, tmp_path, "wrong")


def test_policies_need_data_on_the_device(tmp_path: Path) -> None:
    config = tiny_config(epochs=1, data_on_device="off")
    config["runs"][1]["views"] = [{"name": "standard"}]
    config["runs"][0]["augmentation"] = {"name": "cutout"}
    with pytest.raises(ConfigError) as caught:
        make_trainer(config, tmp_path)
    paths = [issue.path for issue in caught.value.issues]
    assert paths == ["runs[0].augmentation", "runs[1].views"]
    assert "applied on the device" in str(caught.value)


@pytest.mark.parametrize("images", ["mnist", "rgb"])
def test_every_built_in_policy_trains_end_to_end_on_the_device(tmp_path: Path, images: str) -> None:
    """An epoch of each built-in policy, composed and as a view, on one-channel MNIST and on RGB 32x32 images."""
    config = tiny_config(epochs=1)
    if images == "rgb":
        from test_reproduce import write_tiny_cifar_npz

        write_tiny_cifar_npz(tmp_path / "tiny.npz")
        config["data"] = {
            "dataset": {"name": "array_file", "params": {"path": str(tmp_path / "tiny.npz")}},
            "batch_size": 8,
        }
        config["defaults"]["backbone"] = {"name": "small_cnn", "params": {"in_channels": 3}}
    config["runs"] = [
        {"name": "aa", "augmentation": {"name": "autoaugment", "params": {"policy": "cifar10"}}},
        {"name": "ra", "augmentation": {"name": "randaugment", "params": {"num_ops": 2, "magnitude": 9}}},
        {"name": "ta", "augmentation": {"name": "trivialaugment"}},
        {"name": "cj", "augmentation": {"name": "color_jitter", "params": {"hue": 0.1}}},
        {
            "name": "paco_like",
            "augmentation": {
                "name": "compose",
                "params": {"policies": [{"name": "autoaugment"}, {"name": "cutout", "params": {"length": 8}}]},
            },  # fmt: skip
            "views": [{"name": "randaugment"}],
        },
    ]
    with ibcore.registry_snapshot():
        trainer, step = recorded(config, tmp_path)
    trained = [line for line in trainer.history if line["split"] == "train"]
    assert len(trained) == 5 and not any("failed" in line for line in trained)
    first = {name: batches[0] for name, batches in step.batches.items()}
    for name in ("aa", "ra", "ta", "cj", "paco_like"):
        assert torch.isfinite(first[name].inputs).all(), name
    assert not torch.equal(first["aa"].inputs, first["ra"].inputs)
    assert len(first["paco_like"].views) == 1 and first["paco_like"].views[0].shape == first["aa"].inputs.shape


def test_two_views_with_one_policy_are_two_different_draws(tmp_path: Path) -> None:
    """Contrastive methods want two different augmentations of each image, even with one policy (SimCLR)."""
    config = tiny_config(epochs=1)
    twice = [{"name": "ibtest_noise"}, {"name": "ibtest_noise"}]
    config["runs"] = [{"name": "plain"}, {"name": "two", "views": twice}, {"name": "again", "views": twice}]
    with ibcore.registry_snapshot():
        register_test_policies()
        _, step = recorded(config, tmp_path)
    for plain, two, again in zip(step.batches["plain"], step.batches["two"], step.batches["again"], strict=True):
        assert two is again  # equal view lists: one batch
        assert torch.equal(two.inputs, plain.inputs)  # the main batch keeps the shared crop and flip
        assert not torch.equal(two.views[0], two.views[1])
        assert torch.equal(two.targets, plain.targets)
