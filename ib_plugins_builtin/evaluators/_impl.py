"""Evaluators in the torchmetrics style: ``reset()``, ``update(logits, targets)`` per batch, ``compute()``.

State lives in tensors on the logits' device, created at the first ``update`` and accumulated
there without a host sync; only ``compute`` copies to the host. Counts are int64 and sums float64
(float32 on Apple MPS, which has no float64), so several batches give the same numbers as one.
Keys are plain identifiers (``acc1``, ``many_acc``, ``ece``), easy to use in pandas and trackers; values
that are percentages are in percent (0-100). Each evaluator declares ``labels``, the column headers of
the results tables (``{"acc1": "acc@1 (%)"}``), and may declare ``headline``, the key that selects the
best epoch on a validation split and sums up an evaluation in the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ibcore import DataError


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _percent(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else 100.0 * numerator / denominator


class LogitsEvaluator:
    """Checks batch shapes; subclasses keep their state and implement ``_update``/``compute``."""

    name = "evaluator"
    labels: dict[str, str] = {}  # metric key -> column header of the results tables (the key when absent)
    headline: str | None = None  # the key of this evaluator's headline metric, if it has one

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch of logits (N, C) and integer targets (N,)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise DataError(
                f"evaluator {self.name!r}: expected logits of shape (N, {self.num_classes}), got {tuple(logits.shape)}"
            )
        if targets.shape != logits.shape[:1]:
            raise DataError(
                f"evaluator {self.name!r}: {logits.shape[0]} logits but targets of shape {tuple(targets.shape)}"
            )
        self._update(logits.detach(), targets.detach().to(device=logits.device, dtype=torch.long))

    def _update(self, logits: Tensor, targets: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class ConfusionEvaluator(LogitsEvaluator):
    """Accumulates the C x C confusion matrix (rows = true class, columns = top-1 prediction).

    Targets outside ``[0, C)`` are counted apart (no sync in ``update``) and reported by ``compute``.
    """

    def reset(self) -> None:
        self._confusion: Tensor | None = None
        self._invalid: Tensor | None = None

    def _update(self, logits: Tensor, targets: Tensor) -> None:
        classes = self.num_classes
        if self._confusion is None or self._invalid is None:
            self._confusion = torch.zeros(classes * classes, dtype=torch.long, device=logits.device)
            self._invalid = torch.zeros((), dtype=torch.long, device=logits.device)
        predictions = logits.argmax(dim=1)
        valid = (targets >= 0) & (targets < classes)
        # Invalid targets go to cell 0 with weight 0, so the index stays in range without a sync.
        cells = torch.where(valid, targets * classes + predictions, torch.zeros_like(targets))
        self._confusion.index_add_(0, cells, valid.long())
        self._invalid += (~valid).sum()

    def confusion(self) -> Tensor:
        """The confusion matrix on the host, (C, C) int64; raises DataError for out-of-range targets."""
        classes = self.num_classes
        if self._confusion is None or self._invalid is None:
            return torch.zeros(classes, classes, dtype=torch.long)
        invalid = int(self._invalid.item())
        if invalid:
            raise DataError(
                f"evaluator {self.name!r}: {invalid} target(s) outside the class range 0..{classes - 1}; "
                "check the data set's labels and num_classes"
            )
        return self._confusion.view(classes, classes).cpu()

    def per_class_accuracy(self) -> list[float | None]:
        """Recall of each class in percent; None for a class with no samples."""
        matrix = self.confusion()
        support = matrix.sum(dim=1).tolist()
        correct = matrix.diagonal().tolist()
        return [_percent(c, n) for c, n in zip(correct, support, strict=True)]


class Accuracy(LogitsEvaluator):
    """Top-k accuracy in percent for each k of ``top_k``: the target is among the k largest logits."""

    name = "accuracy"

    def __init__(self, num_classes: int, top_k: Sequence[int] = (1,)) -> None:
        self.top_k = tuple(sorted(set(top_k)))
        self.labels = {f"acc{k}": f"acc@{k} (%)" for k in self.top_k}
        self.headline = f"acc{self.top_k[0]}"
        super().__init__(num_classes)

    def reset(self) -> None:
        self._correct: Tensor | None = None
        self._count: Tensor | None = None

    def _update(self, logits: Tensor, targets: Tensor) -> None:
        if self._correct is None or self._count is None:
            self._correct = torch.zeros(len(self.top_k), dtype=torch.long, device=logits.device)
            self._count = torch.zeros((), dtype=torch.long, device=logits.device)
        ranked = logits.topk(max(self.top_k), dim=1).indices
        hits = ranked == targets.unsqueeze(1)  # (N, max_k), at most one True per row
        cumulative = hits.cumsum(dim=1)
        self._correct += torch.stack([cumulative[:, k - 1].sum() for k in self.top_k])
        self._count += targets.shape[0]

    def compute(self) -> dict[str, Any]:
        if self._correct is None or self._count is None:
            return {f"acc{k}": None for k in self.top_k}
        correct = self._correct.tolist()
        count = int(self._count.item())
        return {f"acc{k}": _percent(hit, count) for k, hit in zip(self.top_k, correct, strict=True)}


class PerClassAccuracy(ConfusionEvaluator):
    """Accuracy (recall) of every class in percent; classes without test samples report None."""

    name = "per_class_accuracy"
    labels = {"per_class_acc": "per-class acc (%)"}

    def compute(self) -> dict[str, Any]:
        accuracies = self.per_class_accuracy()
        return {
            "per_class_acc": accuracies,
            "classes_without_samples": [index for index, value in enumerate(accuracies) if value is None],
        }


def shot_groups(class_counts: Sequence[int], many_threshold: int, few_threshold: int) -> dict[str, list[int]]:
    """Class ids by training-set size: many (> many_threshold), few (< few_threshold), medium (the rest)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for index, count in enumerate(class_counts):
        if count > many_threshold:
            groups["many"].append(index)
        elif count < few_threshold:
            groups["few"].append(index)
        else:
            groups["medium"].append(index)
    return groups


class ShotAccuracy(ConfusionEvaluator):
    """Many/medium/few-shot accuracy: the mean of the per-class accuracies within each group.

    Groups follow the ``shot_acc`` of Kang et al.'s decoupling code: many > 100, few < 20, medium
    otherwise (20..100 inclusive) training images (OLTR's original puts 100 in many and 20 in few).
    Like that code, a group's value averages the accuracies of its classes that appear in the test
    split (not the pooled accuracy of their images); a group with none reports None.
    """

    name = "shot_accuracy"
    labels = {"many_acc": "many (%)", "medium_acc": "medium (%)", "few_acc": "few (%)"}

    def __init__(self, num_classes: int, class_counts: Sequence[int], many_threshold: int, few_threshold: int) -> None:
        self.groups = shot_groups(class_counts, many_threshold, few_threshold)
        super().__init__(num_classes)

    def compute(self) -> dict[str, Any]:
        accuracies = self.per_class_accuracy()
        result: dict[str, Any] = {}
        for group, members in self.groups.items():
            present = [accuracies[index] for index in members if accuracies[index] is not None]
            result[f"{group}_acc"] = sum(present) / len(present) if present else None  # type: ignore[arg-type]
        result["shot_groups"] = {group: list(members) for group, members in self.groups.items()}
        return result


class BalancedAccuracy(ConfusionEvaluator):
    """Mean per-class recall in percent, over the classes present in the test split (as scikit-learn)."""

    name = "balanced_accuracy"
    labels = {"balanced_acc": "balanced (%)"}
    headline = "balanced_acc"

    def compute(self) -> dict[str, Any]:
        present = [value for value in self.per_class_accuracy() if value is not None]
        return {"balanced_acc": sum(present) / len(present) if present else None}


class MacroF1(ConfusionEvaluator):
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN), in percent.

    Averaged over the classes that occur in the targets or the predictions, as scikit-learn's
    ``f1_score(average='macro')`` does by default; a class that never occurs is left out.
    """

    name = "macro_f1"
    labels = {"macro_f1": "macro F1 (%)"}

    def compute(self) -> dict[str, Any]:
        matrix = self.confusion()
        true_positive = matrix.diagonal()
        false_positive = matrix.sum(dim=0) - true_positive
        false_negative = matrix.sum(dim=1) - true_positive
        denominator = (2 * true_positive + false_positive + false_negative).tolist()
        scores = [200.0 * tp / d for tp, d in zip(true_positive.tolist(), denominator, strict=True) if d > 0]
        return {"macro_f1": sum(scores) / len(scores) if scores else None}


class ConfusionMatrix(ConfusionEvaluator):
    """The C x C confusion matrix as nested lists: rows are true classes, columns predictions."""

    name = "confusion_matrix"

    def compute(self) -> dict[str, Any]:
        return {"confusion_matrix": self.confusion().tolist()}


class ExpectedCalibrationError(LogitsEvaluator):
    """ECE in percent: sum over confidence bins of (bin share) * |accuracy - mean confidence|.

    Guo et al. (ICML 2017): confidence = max softmax probability, ``num_bins`` equal-width bins
    (lower, upper] over [0, 1] (15 by default, as in their code).
    """

    name = "ece"
    labels = {"ece": "ece (%)"}

    def __init__(self, num_classes: int, num_bins: int = 15) -> None:
        self.num_bins = num_bins
        super().__init__(num_classes)

    def reset(self) -> None:
        self._count: Tensor | None = None
        self._confidence: Tensor | None = None
        self._correct: Tensor | None = None

    def _update(self, logits: Tensor, targets: Tensor) -> None:
        device = logits.device
        if self._count is None or self._confidence is None or self._correct is None:
            self._count = torch.zeros(self.num_bins, dtype=torch.long, device=device)
            self._confidence = torch.zeros(self.num_bins, dtype=_sum_dtype(device), device=device)
            self._correct = torch.zeros(self.num_bins, dtype=torch.long, device=device)
        confidence, prediction = F.softmax(logits.float(), dim=1).max(dim=1)
        upper_edges = torch.linspace(0.0, 1.0, self.num_bins + 1, device=device)[1:]
        # bucketize(right=False) puts c in bin i when edge[i-1] < c <= edge[i]: Guo et al.'s (lower, upper].
        bins = torch.bucketize(confidence, upper_edges).clamp_(max=self.num_bins - 1)
        self._count.index_add_(0, bins, torch.ones_like(bins))
        self._confidence.index_add_(0, bins, confidence.to(self._confidence.dtype))
        self._correct.index_add_(0, bins, (prediction == targets).long())

    def compute(self) -> dict[str, Any]:
        if self._count is None or self._confidence is None or self._correct is None:
            return {"ece": None}
        counts = self._count.cpu().double()
        total = float(counts.sum())
        if total == 0:
            return {"ece": None}
        gaps = (self._correct.cpu().double() - self._confidence.cpu().double()).abs()
        # sum_b (n_b / N) * |acc_b - conf_b| = sum_b |correct_b - confidence_sum_b| / N
        ece = 100.0 * float(gaps.sum()) / total
        # The bins themselves, for a reliability diagram (report.html, calibration.png): in percent, None where empty.
        per_bin = [
            (int(n), 100.0 * float(c) / float(n) if n else None, 100.0 * float(k) / float(n) if n else None)
            for n, c, k in zip(
                counts.tolist(), self._confidence.cpu().double().tolist(), self._correct.cpu().tolist(), strict=True
            )
        ]
        bins = {
            "count": [b[0] for b in per_bin],
            "confidence": [b[1] for b in per_bin],
            "accuracy": [b[2] for b in per_bin],
        }
        return {"ece": ece, "ece_bins": bins}


class NegativeLogLikelihood(LogitsEvaluator):
    """Mean negative log-likelihood of the targets under the softmax of the logits (nats)."""

    name = "nll"

    def reset(self) -> None:
        self._total: Tensor | None = None
        self._count: Tensor | None = None
        self._invalid: Tensor | None = None

    def _update(self, logits: Tensor, targets: Tensor) -> None:
        device = logits.device
        if self._total is None or self._count is None or self._invalid is None:
            self._total = torch.zeros((), dtype=_sum_dtype(device), device=device)
            self._count = torch.zeros((), dtype=torch.long, device=device)
            self._invalid = torch.zeros((), dtype=torch.long, device=device)
        # Out-of-range targets would trip a device-side assert in cross_entropy: count them instead.
        valid = (targets >= 0) & (targets < self.num_classes)
        losses = F.cross_entropy(logits.float(), targets.clamp(0, self.num_classes - 1), reduction="none")
        # Summed in float64, so the total does not depend on how the test set is split into batches.
        self._total += (losses.to(self._total.dtype) * valid).sum()
        self._count += targets.shape[0]
        self._invalid += (~valid).sum()

    def compute(self) -> dict[str, Any]:
        if self._total is None or self._count is None or self._invalid is None:
            return {"nll": None}
        invalid = int(self._invalid.item())
        if invalid:
            raise DataError(
                f"evaluator {self.name!r}: {invalid} target(s) outside the class range 0..{self.num_classes - 1}; "
                "check the data set's labels and num_classes"
            )
        count = int(self._count.item())
        return {"nll": float(self._total.item()) / count if count else None}
