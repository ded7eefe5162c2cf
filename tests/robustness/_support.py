"""Helpers shared by the robustness suite: a valid base config, hypothesis settings, example counts, plugins.

Imported as ``_support`` (pytest puts this folder on ``sys.path`` for the test modules next to it).
"""

from __future__ import annotations

import collections
import copy
import os
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

# The embedded mnist_lt / small_cnn / sgd / cross_entropy: every property mutates a copy of this.
# It uses every section of the format (defaults, a run override, a stage, class weights, evaluators)
# so mutations reach every model of the schema.
BASE_CONFIG: dict[str, Any] = {
    "seed": 1,
    "data": {
        "dataset": {"name": "mnist_lt", "params": {"imbalance_ratio": 50, "test_per_class": 20}},
        "batch_size": 64,
    },
    "trainer": {"epochs": 4, "device": "cpu", "eval_every": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
    "defaults": {
        "backbone": {"name": "small_cnn"},
        "optimizer": {"name": "sgd", "params": {"lr": 0.05, "momentum": 0.9, "milestones": [2]}},
        "loss": {"name": "cross_entropy"},
    },
    "runs": [
        {"name": "ce"},
        {
            "name": "focal",
            "loss": {
                "name": "focal",
                "params": {"gamma": 1.0, "class_weights": {"name": "effective_number", "beta": 0.999}},
            },
            "stages": [{"from_epoch": 2, "sampler": {"name": "class_balanced"}}],
        },
    ],
    "evaluators": [{"name": "accuracy"}, {"name": "shot_accuracy"}],
}


def base_config() -> dict[str, Any]:
    """A fresh deep copy of :data:`BASE_CONFIG` (tests mutate it)."""
    return copy.deepcopy(BASE_CONFIG)


# --------------------------------------------------------------------------------------------
# Property-test settings and the number of examples each property ran

#: examples actually run per property (after ``assume``), printed at the end of the session and
#: copied into docs/reliability.md
EXAMPLES_RUN: collections.Counter[str] = collections.Counter()

#: ``IB_FUZZ_SCALE=20 pytest tests/robustness`` runs twenty times more examples (a deeper, slower search)
FUZZ_SCALE = float(os.environ.get("IB_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic (derandomized, no example database) settings, so CI never flakes on a new draw.

    No deadline: a slow or busy machine must not fail a property; work is bounded by the loader's size
    limits, which tests check by counting (nodes, bytes, memory), not seconds. Set ``IB_FUZZ_SCALE`` to
    search deeper locally.
    """
    return settings(
        max_examples=max(1, int(max_examples * FUZZ_SCALE)),
        deadline=None,
        derandomize=FUZZ_SCALE == 1,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def count_example(name: str) -> None:
    """Record that property ``name`` ran one more example."""
    EXAMPLES_RUN[name] += 1


# --------------------------------------------------------------------------------------------
# Tiny plugin modules written next to a config (listed under ``plugins:``)

TINY_DATA_PLUGIN = '''\
"""Synthetic 1x8x8 images, 4 classes: options for a NaN image and a class absent from the test split."""
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ibcore import NoParams, Params, register_dataset, register_loss


class _Split:
    """A DataLoader split (no tensors()), so float images with NaN reach the model unchanged."""

    def __init__(self, per_class, seed, nan_index=None):
        generator = torch.Generator().manual_seed(seed)
        self.num_classes = len(per_class)
        self.targets = np.array([c for c, n in enumerate(per_class) for _ in range(n)], dtype=np.int64)
        self.class_counts = [int(n) for n in per_class]
        labels = torch.as_tensor(self.targets, dtype=torch.float32)
        self.images = torch.randn(len(self.targets), 1, 8, 8, generator=generator) + labels[:, None, None, None]
        if nan_index is not None:
            self.images[nan_index] = float("nan")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


class _Dataset:
    def __init__(self, train, test):
        self.num_classes, self.train, self.test, self.val = train.num_classes, train, test, None


class TinyParams(Params):
    nan_index: int | None = Field(None, ge=0, description="training image filled with NaN")
    drop_test_class: int | None = Field(None, ge=0, le=3, description="class with no test images")
    train_per_class: list[int] = Field([40, 20, 10, 5], min_length=4, max_length=4)


@register_dataset("ibtest_tiny", TinyParams)
def build_tiny(params, context):
    """Synthetic 8x8 long-tailed data set for robustness tests."""
    test_counts = [0 if c == params.drop_test_class else 5 for c in range(4)]
    return _Dataset(_Split(params.train_per_class, 0, params.nan_index), _Split(test_counts, 1))


class _InfiniteLoss:
    def __call__(self, logits, targets, sample_weight=None):
        return F.cross_entropy(logits, targets) * float("inf")


@register_loss("ibtest_infinite", NoParams)
def build_infinite(params, context):
    """Cross-entropy times infinity: every step is non-finite."""
    return _InfiniteLoss()
'''


def tiny_config(**trainer: Any) -> dict[str, Any]:
    """A config on the ``ibtest_tiny`` data set of :data:`TINY_DATA_PLUGIN` (seconds on a CPU)."""
    return {
        "seed": 2,
        "plugins": ["ibtest_tiny_data"],
        "data": {"dataset": {"name": "ibtest_tiny"}, "batch_size": 16},
        "trainer": {"epochs": 2, "device": "cpu", "eval_every": 1, "checkpoint_every": 1, **trainer},
        "defaults": {
            "backbone": {"name": "small_cnn", "params": {"width": 4}},
            "optimizer": {"name": "sgd", "params": {"lr": 0.05}},
            "loss": {"name": "cross_entropy"},
        },
        "runs": [{"name": "ce"}],
        "evaluators": [{"name": "accuracy"}, {"name": "nll"}],
    }


def write_module(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def no_traceback(output: str) -> bool:
    """True when ``output`` holds no Python traceback (what a user must never see for their own mistake)."""
    return "Traceback (most recent call last)" not in output
